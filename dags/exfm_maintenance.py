"""
### exfm_maintenance — keeps a lakehouse that runs for months healthy (jobs/maintenance.py)

Weekly by default (`EXFM_MAINTENANCE_SCHEDULE`, any Airflow schedule); retention counts back
from the run's day and comes from config `maintenance`:

* `compact_and_vacuum`, one mapped task per Delta table: OPTIMIZE of the bookkeeping tables,
  VACUUM of every table (`retention_hours`, at least Delta's 7 days: its safety check stays on)
* `staging`: published days leave the staging copies after `staging_days`
* `quarantine`: failed attempts older than `quarantine_days`
* `scratch`: `_scratch` directories a killed reader left
* `fm_snapshots`: the FM's snapshot GC (held, leased and the newest `das.keep_last` stay)
* `vm_snapshots`: per (vm, method) the newest `keep_vm_snapshots` and every snapshot of the last
  `snapshot_days` stay (a backfill inside them resumes)
* `data_docs`: GX validation results and Data Docs pages older than `data_docs_days`

Trigger with `{"dry_run": true}` to list what would go: each task returns (and logs) what it
removed or would remove, with the bytes.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from dags.exfm_common import SPARK_POOL, notify_failure, task_context


def _step(name: str, **kwargs) -> dict:
    from jobs import maintenance

    ds, cfg, spark = task_context()
    dry_run = bool(get_current_context()["params"]["dry_run"])
    return maintenance.STEPS[name](ds, cfg, spark, dry_run=dry_run, **kwargs)


@dag(
    schedule=os.environ.get("EXFM_MAINTENANCE_SCHEDULE", "@weekly"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "dry_run": Param(False, type="boolean", description="list what would be removed, remove nothing")
    },
    default_args={"pool": SPARK_POOL, "retries": 1, "on_failure_callback": notify_failure},
    doc_md=__doc__,
    tags=["exfm"],
)
def exfm_maintenance():
    @task(doc_md="The lakehouse's Delta tables: the fan-out of `compact_and_vacuum`.")
    def delta_tables() -> list[str]:
        from jobs import maintenance
        from jobs.config import load_config

        return maintenance.tables(load_config())

    @task(map_index_template="{{ table }}", doc_md="OPTIMIZE (bookkeeping tables) and VACUUM of one table.")
    def compact_and_vacuum(table: str) -> dict:
        get_current_context()["table"] = table  # the mapped task's name in the UI
        return _step("compact_and_vacuum", only=[table])

    @task(doc_md="Drop published days older than `maintenance.staging_days` from the staging copies.")
    def staging() -> dict:
        return _step("staging")

    @task(doc_md="Delete failed attempts in `_quarantine` older than `maintenance.quarantine_days`.")
    def quarantine() -> dict:
        return _step("quarantine")

    @task(doc_md="Delete `_scratch` directories older than `maintenance.scratch_hours`.")
    def scratch() -> dict:
        return _step("scratch")

    @task(doc_md="FM snapshot GC: files of snapshots not held, not leased, not among the newest K.")
    def fm_snapshots() -> dict:
        return _step("fm_snapshots")

    @task(doc_md="VM snapshot GC: keep the newest K per (vm, method) and the last `snapshot_days`.")
    def vm_snapshots() -> dict:
        return _step("vm_snapshots")

    @task(doc_md="GX validation results and Data Docs pages older than `maintenance.data_docs_days`.")
    def data_docs() -> dict:
        return _step("data_docs")

    # The steps are independent; staging drops its days before the vacuum so the files are
    # tombstoned a week earlier, and the snapshot GCs wait so that one Spark job runs at a time.
    staging() >> compact_and_vacuum.expand(table=delta_tables()) >> [fm_snapshots(), vm_snapshots()]
    quarantine(), scratch(), data_docs()


exfm_maintenance()
