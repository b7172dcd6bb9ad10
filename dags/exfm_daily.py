"""exfm_daily: one day of the ExFM pipeline, for the data interval's day.

ingest_traffic -> build_fm_dataset -> train_fm. Each task calls the same ``jobs.<step>.run``
as the ``exfm`` CLI, so a step can be re-run or debugged without Airflow. Only the standard
library, pendulum and airflow.sdk are imported at parse time.
The DAS, VM fan-out, evaluation and data-quality gates join as their issues land.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task


def _step(name: str):
    """(run function, config, SparkSession) for a step; heavy imports happen here, in the task."""
    import importlib

    from jobs.config import load_config
    from jobs.spark import build_spark

    cfg = load_config()  # $EXFM_CONFIG or exfm.yaml, with EXFM__* overrides
    return importlib.import_module(f"jobs.{name}").run, cfg, build_spark(cfg)


def _ds() -> str:
    return get_current_context()["data_interval_start"].to_date_string()


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": pendulum.duration(minutes=5)},
    tags=["exfm"],
)
def exfm_daily():
    @task
    def ingest_traffic() -> dict:
        """Landing files of the day -> vm_traffic."""
        run, cfg, spark = _step("ingest")
        return run(_ds(), cfg, spark)

    @task
    def build_fm_dataset() -> dict:
        """vm_traffic of the day -> fm_dataset."""
        run, cfg, spark = _step("fm_dataset")
        return run(_ds(), cfg, spark)

    @task(depends_on_past=True)  # the FM of day t continues from the FM of day t-1
    def train_fm() -> dict:
        """One pass of the FM over the day, from yesterday's snapshot."""
        run, cfg, spark = _step("train_fm")
        result = run(_ds(), cfg, spark)
        return {k: result[k] for k in ("ds", "snapshot", "sha256", "n_examples", "train_loss")}

    ingest_traffic() >> build_fm_dataset() >> train_fm()


exfm_daily()
