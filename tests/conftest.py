"""Shared fixtures: one real local SparkSession with Delta for the whole run, tiny configs."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from jobs.config import ExfmConfig, load_config

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds per day, big enough that every VM, duplicate and shared request occurs.
TINY = [
    "synthetic.rows_per_day=1500",
    "synthetic.rows_per_file=1000",  # two chunks -> two files per VM per day
    "synthetic.users=300",
    "synthetic.ads=100",
    "synthetic.duplicate_rate=0.01",
    "spark.master=local[2]",
    "spark.shuffle_partitions=2",
    "spark.interpreted_projections=true",  # a day of 1,500 rows: no code generated per task
    "spark.conf.spark.ui.enabled=false",  # no web UI: a new driver starts ~1 CPU-s sooner, opens no port
    # No adaptive re-planning: at 1,500 rows it only adds planning and jobs (README, "Tiny days").
    "spark.conf.spark.sql.adaptive.enabled=false",
    # Tiny days: a larger holdout and tolerance keep the blessing of a healthy FM out of the noise.
    "das.blessing.holdout_fraction=0.2",
    "das.blessing.ne_tolerance=0.05",
]

# A driver that lives for one step in a process of its own (a CLI command) takes C1 only, whose
# quick compiles pay off before the optimising tier's would; a demo of two tiny days already pays
# for the optimising tier (README, "A driver's start"), the session's driver too.
SHORT_LIVED = ["spark.quick_jit=true"]


def tiny_config(root: Path, *overrides: str) -> ExfmConfig:
    """The default registry with tiny synthetic data, everything under ``root``."""
    return load_config(
        REPO / "exfm.yaml",
        overrides=[
            *TINY,
            f"lakehouse_root={root / 'lakehouse'}",
            f"landing_root={root / 'landing'}",
            f"truth_root={root / 'truth'}",
            *overrides,
        ],
        env={},  # the developer's EXFM__* variables must not change test results
    )


def land_days(days, cfg: ExfmConfig, spark) -> None:
    """The start of the DAG for each day: synthetic files, ingest, gate, FM dataset, gate."""
    from jobs import fm_dataset, generate, ingest, quality
    from jobs.lakehouse import FM_DATASET, VM_TRAFFIC

    for day in days:
        generate.run(day, cfg)
        ingest.run(day, cfg, spark)
        quality.run(VM_TRAFFIC, day, cfg, spark)
        fm_dataset.run(day, cfg, spark)
        quality.run(FM_DATASET, day, cfg, spark)


def stop_group(process: subprocess.Popen) -> None:
    """Stop ``process`` and every process of its group (started with ``start_new_session``)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    try:  # a child may have outlived the process that started it
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# The suite runs on every core (pytest-xdist, a file per worker: pyproject's addopts), and a
# worker takes the next file when it is free: the files go longest first (CPU-s each in a full
# run, 2026-12-07: 476, 459, 226, 225, 217, 201, 200, 166, 126, 93, 80, 53, 33; the rest < 11), so
# the last to start are short and no worker idles while another ends a long one.
LONGEST_FIRST = (
    "test_faults.py",
    "test_airflow_e2e.py",
    "test_das.py",
    "test_training.py",
    "test_study.py",
    "test_maintenance.py",
    "test_quality.py",
    "test_dags.py",
    "test_spark_connect.py",
    "test_cold_start.py",
    "test_ingest.py",
    "test_fm_dataset.py",
    "test_spark.py",
)


def pytest_collection_modifyitems(items) -> None:
    def rank(item) -> int:
        return LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture
def cfg(tmp_path) -> ExfmConfig:
    return tiny_config(tmp_path)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    import os

    from jobs.spark import build_spark

    # The jar cache is shared with ./exfm runs; the suite must not depend on the developer's env.
    jars_cache = os.environ.get("EXFM__SPARK__JARS_CACHE", "~/.cache/exfm/jars")
    session = build_spark(
        tiny_config(
            tmp_path_factory.mktemp("spark"), f"spark.jars_cache={jars_cache}", "spark.app_name=exfm-tests"
        )
    )
    yield session
    session.stop()
