"""What the exfm DAGs share: where a task's config and Spark come from, how bad data fails a
task, and who hears of a failure. Not a DAG file (see .airflowignore); light imports only."""

from __future__ import annotations

import functools

from airflow.sdk import get_current_context

SPARK_POOL = "exfm_spark"  # one slot per Spark session the machine can hold (`airflow pools set`)


def task_context():
    """(ds, config, SparkSession) for a task; heavy imports happen here, inside the task."""
    from jobs.config import load_config
    from jobs.spark import build_spark

    cfg = with_spark_connection(load_config())  # $EXFM_CONFIG or exfm.yaml, EXFM__* overrides
    return get_current_context()["data_interval_start"].to_date_string(), cfg, build_spark(cfg)


def with_spark_connection(cfg):
    """The `spark_default` connection, if defined, says where the jobs' Spark is.

    A Spark Connect connection (type `spark_connect`, or the URI sc://host:port) makes every task a
    thin client of that server (config `spark.remote`); a Spark connection (spark://host:7077,
    yarn, k8s://...) sets the master of a driver per task, with extra spark.* conf. That
    connection is the only change needed to run the jobs on a cluster; without it the config
    decides (`spark.remote`, else `spark.master`, local[*]).
    """
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = Connection.get("spark_default")
    except AirflowNotFoundException:
        return cfg
    host = conn.host or ""
    if conn.conn_type in ("spark_connect", "sc") or host.startswith("sc://"):  # "sc": a URI sc://host:port
        remote = f"sc://{host.removeprefix('sc://')}" + (f":{conn.port}" if conn.port else "")  # else 15002
        return cfg.model_copy(update={"spark": cfg.spark.model_copy(update={"remote": remote})})
    master = host or cfg.spark.master
    if conn.conn_type == "spark" and "://" not in master and not master.startswith(("local", "yarn")):
        master = f"spark://{master}"
    if conn.port:
        master = f"{master}:{conn.port}"
    spark = cfg.spark.model_copy(update={"master": master, "conf": {**cfg.spark.conf, **conn.extra_dejson}})
    return cfg.model_copy(update={"spark": spark})


def bad_data_fails_at_once(step):
    """A contract or quality failure (``DataError``) fails the task without its retries: the same
    data fails the same way, and retrying would only delay the message by minutes."""

    @functools.wraps(step)
    def run(*args, **kwargs):
        from airflow.sdk.exceptions import AirflowFailException

        from jobs.config import DataError

        try:
            return step(*args, **kwargs)
        except DataError as e:
            raise AirflowFailException(str(e)) from e

    return run


def notify_failure(context) -> None:
    """Every final task failure reaches the notifiers of config `alerts.notifiers` (Airflow
    ``BaseNotifier`` classes with their arguments), so where alarms go is configuration."""
    import importlib

    from jobs.config import load_config

    for spec in load_config().alerts.notifiers:
        module, _, name = spec.cls.rpartition(".")
        getattr(importlib.import_module(module), name)(**spec.args)(context)
