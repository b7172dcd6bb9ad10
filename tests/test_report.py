"""The run report renders in a real browser: Debian's headless Chromium driven by Selenium."""

import shutil

import pytest

from jobs import report
from jobs.config import parse_ds
from jobs.evaluate import SCHEMA
from jobs.lakehouse import VM_EVAL, replace_partition
from tests.conftest import tiny_config

DAYS = ["2026-01-02", "2026-01-03", "2026-01-04"]


@pytest.fixture(scope="module")
def written(spark, tmp_path_factory):
    """vm_eval rows for three days (as evaluate writes them) and the report of the last day."""
    cfg = tiny_config(tmp_path_factory.mktemp("report"))
    for i, ds in enumerate(DAYS):
        rows = []
        for vm in cfg.vms:
            for method, ne in (("none", 0.95), ("ah_sa", 0.93), ("fm", 0.9)):
                rows.append(
                    {
                        "ds": ds,
                        "vm": vm.name,
                        "method": method,
                        "model_ds": f"2026-01-0{i + 1}",
                        "snapshot_uri": f"/snapshots/{vm.name}/{method}",
                        "n": 1000,
                        "ne": ne + 0.01 * (len(DAYS) - 1 - i),  # improving; exact on the last day
                        "ne_eval_base": ne,
                        "auc": 0.7,
                        "logloss": 0.2,
                        "calibration": 1.02,
                        "ctr": 0.05,
                        "fm_staleness_days": None if method == "none" else (0 if method == "fm" else 1),
                        "teacher_snapshot_id": None if method == "none" else "fm-x",
                        "oracle_ne": 0.85,
                    }
                )
        replace_partition(
            spark.createDataFrame(rows, SCHEMA), cfg, VM_EVAL, ["ds"], order=("vm", "method"), ds=parse_ds(ds)
        )
    pages = [report.run(ds, cfg, spark) for ds in DAYS]
    return cfg, pages


def test_report_lists_every_vm_with_gains_and_links_days(written):
    cfg, pages = written
    html = open(pages[-1]["report"], encoding="utf-8").read()
    assert pages[-1]["eval_rows"] == 3 * len(cfg.vms)
    for vm in cfg.vms:
        assert f"id='vm-{vm.name}'" in html
    # (0.95 - 0.93) / 0.95 = +2.11% for ah_sa, (0.95 - 0.9) / 0.95 = +5.26% for the FM
    assert "+2.11%" in html and "+5.26%" in html
    assert html.count("The FM&#x27;s value: NE gain over none by day") == len(cfg.vms)
    index = open(pages[-1]["index"], encoding="utf-8").read()
    assert all(f"ds={ds}.html" in index for ds in DAYS) and "ah_sa: +2.11%" in index


def test_report_renders_tables_and_plots_in_headless_chromium(written):
    _, pages = written
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and chromedriver, (
        "the report test needs Debian's chromium and chromium-driver: "
        "apt-get install chromium chromium-driver (.ci/run installs them)"
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        driver.set_window_size(1400, 1000)
        driver.get("file://" + pages[-1]["report"])
        tables = driver.find_elements(By.CSS_SELECTOR, "table.eval")
        assert len(tables) == 3
        for table in tables:
            rows = table.find_elements(By.TAG_NAME, "tr")
            assert len(rows) == 4 and table.size["height"] > 50  # header + none, ah_sa, fm
        plots = driver.find_elements(By.CSS_SELECTOR, "figure.plot svg")
        assert len(plots) == 12  # per VM: NE, staleness, gain over none by day, teacher calibration
        for svg in plots:
            assert svg.size["width"] > 200 and svg.size["height"] > 100
            assert svg.find_elements(By.CSS_SELECTOR, "path, polyline, line")  # the drawn lines
        driver.get("file://" + pages[-1]["index"])
        links = driver.find_elements(By.CSS_SELECTOR, "a")
        assert sorted(a.text for a in links) == DAYS
    finally:
        driver.quit()
