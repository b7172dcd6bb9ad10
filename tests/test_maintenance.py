"""exfm_maintenance on a real lakehouse with old days: only what retention allows goes.

A world of three days (traffic, gates, the FM, the DAS, two VM chains), a quarantined attempt,
an orphan VM snapshot directory and scratch directories; then the maintenance DAG, through
Airflow's dag.test(), for a day that makes the first days old. Every table must still read and
time-travel, and a backfill of a day inside the retention must still run.
"""

import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from jobs import das, maintenance, publishing, quality, train_fm, train_vm
from jobs.config import ENV_PREFIX
from jobs.lakehouse import SCRATCH, VM_SNAPSHOTS, VM_TRAFFIC, VM_TRAINING, table_version
from tests.conftest import TINY, land_days, tiny_config
from tests.test_dags import airflow_env
from tests.test_ingest import checksum

DAYS = [dt.date(2026, 1, 1) + dt.timedelta(days=i) for i in range(3)]
MAINTENANCE_DAY = DAYS[-1] + dt.timedelta(days=1)
# Retention counted back from MAINTENANCE_DAY: day 1 is old for everything, days 2-3 are kept
# where the retention is 2 days (a backfill of day 3 resumes from day 2).
RETENTION = [
    "maintenance.staging_days=2",
    "maintenance.quarantine_days=2",
    "maintenance.snapshot_days=2",
    "maintenance.keep_vm_snapshots=1",
    "maintenance.data_docs_days=2",
    "maintenance.scratch_hours=1",
]
CHAINS = [("feed", "ah_sa"), ("feed", "none")]


@pytest.fixture(scope="module")
def world(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("maintenance")
    cfg = tiny_config(root, *RETENTION)
    land_days(DAYS, cfg, spark)
    for day in DAYS:
        train_fm.run(day, cfg, spark)
        publishing.update_pointer(cfg, spark)
        if day > DAYS[0]:
            das.run(day, cfg, spark)
            quality.run(VM_TRAINING, day, cfg, spark)
        for vm, method in CHAINS:
            train_vm.run(day, vm, cfg, spark, method=method)
    # A failed gate of day 1 and of day 3: their attempts are quarantined.
    for day in (DAYS[0], DAYS[2]):
        bad = spark.read.format("delta").load(cfg.table(VM_TRAFFIC)).where(F.col("ds") == day.isoformat())
        quality.stage(bad.withColumn("click", F.lit(7)), cfg, VM_TRAFFIC, day)
        with pytest.raises(quality.QualityError):
            quality.run(VM_TRAFFIC, day, cfg, spark)
        quality.stage(bad, cfg, VM_TRAFFIC, day)  # and staged again as it was published
    # What a killed training and a killed reader leave: a snapshot directory with no row, scratch.
    orphan = Path(cfg.snapshots) / "vm" / "feed" / "ah_sa" / "ds=2025-12-01"
    orphan.mkdir(parents=True)
    (orphan / "model-0.pt").write_bytes(b"x" * 100)
    for name, age_hours in (("old", 5), ("live", 0)):
        path = Path(cfg.table(SCRATCH)) / name
        path.mkdir(parents=True)
        (path / "part-0.parquet").write_bytes(b"x" * 10)
        stamp = time.time() - age_hours * 3600
        os.utime(path, (stamp, stamp))
    return root, cfg


def _files(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _tables(spark, cfg) -> dict:
    return {
        t: (table_version(cfg, t), checksum(spark.read.format("delta").load(cfg.table(t))))
        for t in maintenance.tables(cfg)
    }


def test_dry_run_lists_and_removes_nothing(spark, world):
    root, cfg = world
    before = _files(root / "lakehouse")
    out = maintenance.run(MAINTENANCE_DAY, cfg, spark, dry_run=True)
    assert _files(root / "lakehouse") == before
    assert any("ds=2025-12-01" in p for p in out["vm_snapshots"]["removed"]) and out["bytes"] > 0
    assert out["staging"]["days"][VM_TRAFFIC] == ["2026-01-01"]


def test_maintenance_dag_removes_only_what_retention_allows(spark, world):
    root, cfg = world
    tables_before = _tables(spark, cfg)
    first_versions = {
        t: checksum(spark.read.format("delta").option("versionAsOf", 0).load(cfg.table(t)))
        for t in maintenance.tables(cfg)
    }
    vm_rows = {
        (r.vm, r.method, r.ds): r.uri
        for r in spark.read.format("delta").load(cfg.table(VM_SNAPSHOTS)).collect()
    }
    docs = sorted(p.name for p in (Path(cfg.docs_root) / "validations").glob("*/*"))

    env = {
        **airflow_env(root),
        **{
            ENV_PREFIX + k.upper().replace(".", "__"): v
            for k, v in (i.split("=", 1) for i in (*TINY, *RETENTION))
        },
        "EXFM__LAKEHOUSE_ROOT": str(root / "lakehouse"),
        "EXFM__SPARK__MASTER": "local[1]",
    }
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, MAINTENANCE_DAY.isoformat()],
        env=env,
        capture_output=True,
        text=True,
        cwd=root,
        timeout=900,
    )
    assert "STATE success" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]

    # VM snapshots: day 1 of each chain and the orphan went (rows first, then files); days 2-3 stay.
    rows = {
        (r.vm, r.method, r.ds) for r in spark.read.format("delta").load(cfg.table(VM_SNAPSHOTS)).collect()
    }
    assert rows == {(vm, m, d.isoformat()) for vm, m in CHAINS for d in DAYS[1:]}
    for (vm, method, ds), uri in vm_rows.items():
        assert Path(uri.removeprefix("file:")).exists() == (ds != "2026-01-01"), (vm, method, ds)
    assert not (Path(cfg.snapshots) / "vm" / "feed" / "ah_sa" / "ds=2025-12-01").exists()
    # Quarantine: day 1's attempt went, day 3's stays. Scratch: only the old directory went.
    quarantined = sorted(p.parent.name for p in Path(cfg.table(quality.QUARANTINE)).glob("*/*/at=*"))
    assert quarantined == ["ds=2026-01-03"]
    assert sorted(p.name for p in Path(cfg.table(SCRATCH)).iterdir()) == ["live"]
    # Staging: the published day 1 left every staging copy; days 2-3 are still staged.
    staged = spark.read.format("delta").load(cfg.table(quality.staging_table(VM_TRAFFIC)))
    assert sorted(r.ds for r in staged.select("ds").distinct().collect()) == ["2026-01-02", "2026-01-03"]
    # Data Docs: day 1's pages went, the others stay, and the index was rebuilt without them.
    kept = sorted(p.name for p in (Path(cfg.docs_root) / "validations").glob("*/*"))
    assert kept == [d for d in docs if not d.endswith("2026-01-01")] and len(kept) < len(docs)
    assert "2026-01-01" not in (Path(cfg.docs_root) / "index.html").read_text()

    # Every published table reads the same, and time-travels to its first version (VACUUM kept
    # what the retention needs); the staging copies changed by the one DELETE only.
    after = _tables(spark, cfg)
    for t, (_, rows_checksum) in tables_before.items():
        if t != VM_SNAPSHOTS and not t.startswith(quality.STAGING):
            assert after[t][1] == rows_checksum, t
    for t, first in first_versions.items():
        assert checksum(spark.read.format("delta").option("versionAsOf", 0).load(cfg.table(t))) == first, t

    # A backfill inside the retention still runs: day 3 again, from day 2's snapshots.
    assert quality.run(VM_TRAFFIC, DAYS[2], cfg, spark)["success"]
    das.run(DAYS[2], cfg, spark)
    quality.run(VM_TRAINING, DAYS[2], cfg, spark)
    for vm, method in CHAINS:
        assert train_vm.run(DAYS[2], vm, cfg, spark, method=method)["n_examples"] > 0


# The maintenance DAG through Airflow's own dag.test() for the day given.
RUNNER = """
import os, subprocess, sys
from pathlib import Path
import pendulum
airflow = str(Path(sys.executable).with_name("airflow"))
subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True)
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).get_dag("exfm_maintenance")
run = dag.test(logical_date=pendulum.parse(sys.argv[1]))
print("STATE", run.state, flush=True)
"""
