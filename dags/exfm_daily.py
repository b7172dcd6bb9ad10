"""
### exfm_daily — one day of ExFM distillation (paper §3.1, DESIGN.md §1)

The data interval's day is `ds`. The FM trained through `ds - 1` supervises the VMs of `ds`;
then the FM trains on `ds` for tomorrow.

* traffic: `ingest_traffic` → `gate_vm_traffic` (GX suite, then publish)
* FM chain: `build_fm_dataset` → `gate_fm_dataset` → `train_fm` → `publish_fm` → `update_pointer`
* DAS: `das_score` → `gate_vm_training` → `train_vm` (one mapped task per (vm, method))
* judge yesterday's models on today: `evaluate` → `gate_vm_eval`
* `teacher_freshness`: the staleness alarm, fails when the day's FM teacher is older than
  `das.max_staleness_days` (the VMs still train: a stale teacher is still a teacher)
* `report`: the day's HTML page

Every task calls the same `jobs.<step>.run` as the `exfm` CLI and is idempotent, so a retry or
a clear is safe. A contract or quality failure fails its task at once (no retry): fix the data
and clear the task. A task that fails for good calls the notifiers of config `alerts.notifiers`
(Airflow's own: SMTP, Slack, ...). Backfill with `--max-active-runs 1`: day t needs the models of day t-1.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import Asset, dag, get_current_context, task

from dags.exfm_common import SPARK_POOL, bad_data_fails_at_once, notify_failure, task_context

# The lakehouse's published tables as Airflow Assets: each task's inlets and outlets, so the UI
# draws the data flow (what reads what another task wrote). Names, not paths: the paths come
# from the config, which the DAG does not load at parse time.
TABLES = (
    "vm_traffic",
    "fm_dataset",
    "fm_snapshots",
    "fm_pointer",
    "vm_training",
    "vm_snapshots",
    "vm_eval",
    "reports",
)
A = {t: Asset(name=f"exfm.{t}", uri=f"exfm://lakehouse/{t}", group="exfm") for t in TABLES}


@bad_data_fails_at_once
def _gate(table: str) -> dict:
    from jobs import quality

    ds, cfg, spark = task_context()
    return quality.run(table, ds, cfg, spark)


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=os.environ.get("EXFM_CATCHUP", "false").lower() == "true",
    max_active_runs=1,  # day t needs day t-1's FM and VMs
    default_args={
        "pool": SPARK_POOL,
        "retries": 2,
        "retry_delay": pendulum.duration(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": pendulum.duration(minutes=30),
        "on_failure_callback": notify_failure,
    },
    doc_md=__doc__,
    tags=["exfm"],
)
def exfm_daily():
    @task(doc_md="Landing files of `ds` → staged `vm_traffic` (contract checks before any write).")
    @bad_data_fails_at_once
    def ingest_traffic() -> dict:
        from jobs import ingest

        return ingest.run(*task_context())

    @task(
        outlets=[A["vm_traffic"]],
        doc_md="GX suite `vm_traffic` on the staged day; publishes it only if it passes.",
    )
    def gate_vm_traffic() -> dict:
        return _gate("vm_traffic")

    @task(
        inlets=[A["vm_traffic"]],
        doc_md="`vm_traffic[ds]` → staged `fm_dataset`: one row per request, union of the VMs' features.",
    )
    def build_fm_dataset() -> dict:
        from jobs import fm_dataset

        return fm_dataset.run(*task_context())

    @task(outlets=[A["fm_dataset"]], doc_md="GX suite `fm_dataset`; publishes the day only if it passes.")
    def gate_fm_dataset() -> dict:
        return _gate("fm_dataset")

    @task(
        depends_on_past=True,
        inlets=[A["fm_dataset"]],
        doc_md="One pass of the FM over `fm_dataset[ds]`, from the FM of `ds-1`.",
    )
    def train_fm() -> dict:
        from jobs import train_fm

        out = train_fm.run(*task_context(), publish=False)
        return {k: out[k] for k in ("ds", "snapshot", "sha256", "n_examples", "train_loss")}

    @task(
        outlets=[A["fm_snapshots"]],
        doc_md="Verify and bless the FM snapshot of `ds`, then append its `fm_snapshots` row.",
    )
    def publish_fm() -> dict:
        from jobs import publishing

        return publishing.publish(*task_context())

    @task(
        inlets=[A["fm_snapshots"]],
        outlets=[A["fm_pointer"]],
        doc_md="Move `fm_pointer` to the newest eligible snapshot (compare-and-set) or extend its lease.",
    )
    def update_pointer() -> dict:
        from jobs import publishing

        _, cfg, spark = task_context()
        return publishing.update_pointer(cfg, spark)

    @task(
        inlets=[A["vm_traffic"], A["fm_pointer"], A["fm_snapshots"]],
        doc_md="DAS: the FM trained through `ds-1` scores every VM row of `ds` → staged `vm_training`.",
    )
    def das_score() -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from jobs import das, publishing

        ds, cfg, spark = task_context()
        if publishing.in_fm_warmup(ds, cfg, spark):
            raise AirflowSkipException(f"{ds} is in the FM's warm-up: no VM trains on it")
        if publishing.teacher_for_day(ds, cfg, spark) is None:
            raise AirflowSkipException(f"no eligible FM snapshot trained before {ds}: the VMs cold-start")
        out = das.run(ds, cfg, spark)
        return {k: out[k] for k in ("ds", "snapshot_id", "fm_staleness_days", "rows", "requests_scored")}

    @task(
        inlets=[A["fm_snapshots"], A["fm_pointer"]],  # and past days' vm_eval, for what staleness costs
        doc_md="The staleness alarm: fails if the FM teacher of `ds` is older than `das.max_staleness_days`.",
    )
    @bad_data_fails_at_once
    def teacher_freshness() -> dict:
        from jobs import freshness

        return freshness.run(*task_context())

    @task(
        outlets=[A["vm_training"]],
        doc_md="GX suite `teacher_scores` (`vm_training`); publishes the day only if it passes.",
    )
    def gate_vm_training() -> dict:
        return _gate("vm_training")

    @task(doc_md="The (vm, method) pairs of the VM registry: the fan-out of `train_vm`.")
    def vm_method_pairs() -> list[dict]:
        from jobs.config import load_config

        return load_config().vm_method_pairs()

    @task(
        depends_on_past=True,  # each (vm, method) continues from its snapshot of ds-1
        trigger_rule="none_failed",  # runs on a cold-start day, when the DAS was skipped
        map_index_template="{{ pair_label }}",
        inlets=[A["vm_training"], A["vm_traffic"]],
        outlets=[A["vm_snapshots"]],
        doc_md="One pass of VM `vm` with `method` over `vm_training[ds, vm]` (labels only on a cold start).",
    )
    def train_vm(pair: dict) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from jobs import publishing, train_vm

        get_current_context()["pair_label"] = f"{pair['vm']}/{pair['method']}"
        ds, cfg, spark = task_context()
        if publishing.in_fm_warmup(ds, cfg, spark):
            raise AirflowSkipException(f"{ds} is in the FM's warm-up (fm.warmup_days={cfg.fm.warmup_days})")
        out = train_vm.run(ds, pair["vm"], cfg, spark, method=pair["method"])
        return {k: out[k] for k in ("ds", "vm", "method", "snapshot", "n_examples", "cold_start")}

    @task(
        trigger_rule="none_failed",  # runs on a cold-start day, when the DAS was skipped
        inlets=[A["vm_snapshots"], A["fm_snapshots"], A["vm_training"], A["vm_traffic"]],
        doc_md="Snapshots of `ds-1` and the teacher scores of `ds` on day `ds`: NE, AUC, calibration.",
    )
    def evaluate() -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from jobs import evaluate

        out = evaluate.run(*task_context())
        if not out["rows"]:
            raise AirflowSkipException(f"no models trained through the day before {out['ds']}")
        return out

    @task(outlets=[A["vm_eval"]], doc_md="GX suite `vm_eval`; publishes the day's metrics only if they pass.")
    def gate_vm_eval() -> dict:
        return _gate("vm_eval")

    @task(
        trigger_rule="none_failed",
        inlets=[A["vm_eval"]],
        outlets=[A["reports"]],
        doc_md="The day's HTML report and the index of all days.",
    )
    def report() -> dict:
        from jobs import report

        return report.run(*task_context())

    traffic = gate_vm_traffic()
    ingest_traffic() >> traffic
    fm_chain = traffic >> build_fm_dataset() >> gate_fm_dataset() >> train_fm() >> publish_fm()
    pointer = fm_chain >> update_pointer()
    scores = traffic >> das_score() >> gate_vm_training()
    students = train_vm.expand(pair=vm_method_pairs())
    scores >> students
    judged = [traffic, scores] >> evaluate() >> gate_vm_eval()  # the `fm` row judges the day's scores
    [pointer, students, judged] >> report()
    teacher_freshness()  # on its own: its failure is the alarm and blocks nothing


exfm_daily()
