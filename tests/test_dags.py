"""The Airflow DAG: parses light, is wired as DESIGN.md §1 says, and runs two real days with dag.test()."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from delta.tables import DeltaTable

from jobs.lakehouse import VM_EVAL, VM_SNAPSHOTS, VM_TRAINING
from tests.conftest import REPO, TINY, tiny_config

DAYS = ["2026-01-01", "2026-01-02"]
STRUCTURE = {
    "ingest_traffic": ["gate_vm_traffic"],
    "gate_vm_traffic": ["build_fm_dataset", "das_score", "evaluate"],
    "build_fm_dataset": ["gate_fm_dataset"],
    "gate_fm_dataset": ["train_fm"],
    "train_fm": ["publish_fm"],
    "publish_fm": ["update_pointer"],
    "update_pointer": ["report"],
    "das_score": ["gate_vm_training"],
    "gate_vm_training": ["evaluate", "train_vm"],
    "vm_method_pairs": ["train_vm"],
    "train_vm": ["report"],
    "evaluate": ["gate_vm_eval"],
    "gate_vm_eval": ["report"],
    "report": [],
    "teacher_freshness": [],
}

MAINTENANCE = {
    "staging": ["compact_and_vacuum"],
    "delta_tables": ["compact_and_vacuum"],
    "compact_and_vacuum": ["fm_snapshots", "vm_snapshots"],
    "fm_snapshots": [],
    "vm_snapshots": [],
    "quarantine": [],
    "scratch": [],
    "data_docs": [],
}

RUNNER = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
heavy = sorted(m for m in ("torch", "pyspark", "jobs", "great_expectations") if m in sys.modules)
dag = bag.dags["exfm_daily"]
weekly = bag.dags["exfm_maintenance"]
print("RESULT " + json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "heavy": heavy,
                              "maintenance": {t.task_id: sorted(t.downstream_task_ids) for t in weekly.tasks},
                              "structure": {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks},
                              "assets": {t.task_id: [sorted(a.name for a in t.inlets),
                                                     sorted(a.name for a in t.outlets)] for t in dag.tasks}}))
"""


def airflow_env(tmp_path) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }


def test_dag_parses_light_and_is_wired_as_designed(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(REPO / "dags")],
        env=airflow_env(tmp_path),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["errors"] == {}  # also: no cycles (a cycle is an import error)
    assert result["heavy"] == []  # nothing heavy at parse time
    assert result["structure"] == STRUCTURE
    assert result["maintenance"] == MAINTENANCE
    # Data flow as Airflow Assets: each table has one writer (its gate or publisher), and a task
    # that reads a table of the same day runs downstream of its writer (snapshots and the pointer
    # it reads are the day before's).
    assets = result["assets"]
    writers = {a: t for t, (_, outs) in assets.items() for a in outs}
    assert (
        writers["exfm.vm_traffic"] == "gate_vm_traffic" and writers["exfm.vm_training"] == "gate_vm_training"
    )
    assert sum(len(outs) for _, outs in assets.values()) == len(writers)  # one writer per table

    def upstream(task, seen=()):
        parents = {t for t, children in STRUCTURE.items() if task in children}
        return parents | {u for p in parents - set(seen) for u in upstream(p, (*seen, *parents))}

    for task, (ins, _) in assets.items():
        for table in set(ins) & {"exfm.vm_traffic", "exfm.fm_dataset", "exfm.vm_training", "exfm.vm_eval"}:
            assert writers[table] in upstream(task), (task, table)


@pytest.fixture(scope="module")
def two_days(tmp_path_factory):
    """The README's main command, `exfm demo`, for two tiny days: dag.test() of each day."""
    tmp_path = tmp_path_factory.mktemp("dag")
    cfg = tiny_config(tmp_path)
    argv = [sys.executable, "-m", "jobs.cli", "demo", "--start", DAYS[0], "--days", "2"]
    for item in [*TINY, f"lakehouse_root={cfg.lakehouse_root}", f"landing_root={cfg.landing_root}"]:
        argv += ["--set", item]
    argv += ["--set", f"truth_root={cfg.truth_root}"]
    done = subprocess.run(argv, env=airflow_env(tmp_path), capture_output=True, text=True, cwd=tmp_path)
    return cfg, done


def test_two_days_run_every_task_and_fan_out_over_the_registry(spark, two_days):
    cfg, done = two_days
    log = done.stdout[-5000:] + done.stderr[-5000:]
    assert done.returncode == 0, log
    lines = {line[:10]: line for line in done.stdout.splitlines() if line[10:24] == "  exfm_daily: "}
    # Day 1 has no FM trained before it: the DAS and the evaluation skip, the VMs cold-start.
    assert "exfm_daily: success (4 skipped, " in lines[DAYS[0]], log
    n_tasks = len(STRUCTURE) - 1 + len(cfg.vm_method_pairs())  # train_vm mapped over every pair
    assert f"exfm_daily: success ({n_tasks} success)" in lines[DAYS[1]], log
    assert "report: " in done.stdout

    trained = DeltaTable.forPath(spark, cfg.table(VM_SNAPSHOTS)).toDF().collect()
    pairs = {(p["vm"], p["method"]) for p in cfg.vm_method_pairs()}
    assert {(r.vm, r.method, r.ds) for r in trained} == {(*p, ds) for p in pairs for ds in DAYS}
    cold = {(r.vm, r.method) for r in trained if r.ds == DAYS[0]}
    assert cold == pairs and all(r.teacher_snapshot_id is None for r in trained if r.ds == DAYS[0])
    warm = [r for r in trained if r.ds == DAYS[1] and r.method != "none"]
    assert all(r.teacher_snapshot_id.startswith("fm-2026-01-01-") for r in warm)

    scored = DeltaTable.forPath(spark, cfg.table(VM_TRAINING)).toDF()
    assert scored.where("ds = '2026-01-01'").isEmpty() and not scored.where("ds = '2026-01-02'").isEmpty()
    evals = DeltaTable.forPath(spark, cfg.table(VM_EVAL)).toDF().where("ds = '2026-01-02'").collect()
    assert {(r.vm, r.method) for r in evals} == pairs | {(v.name, "fm") for v in cfg.vms} | {
        ("all", "fm_merged")
    }
    assert all(0 < r.ne < 2 and 0 <= r.auc <= 1 for r in evals)
    assert all(r.oracle_ne < r.ne for r in evals if r.vm != "all")
    assert os.path.exists(cfg.table("reports") + "/ds=2026-01-02.html")


def test_fm_row_is_the_teacher_as_the_vms_saw_it(spark, two_days):
    """vm_eval's `fm` row is NE/calibration of vm_training.teacher_score against the day's labels."""
    from models.metrics import LOGLOSS_EPS, entropy

    cfg, _ = two_days
    evals = DeltaTable.forPath(spark, cfg.table(VM_EVAL)).toDF().where("ds = '2026-01-02'")
    scored = DeltaTable.forPath(spark, cfg.table(VM_TRAINING)).toDF().where("ds = '2026-01-02'")
    traffic = DeltaTable.forPath(spark, cfg.table("vm_traffic")).toDF().where("ds = '2026-01-01'")
    for vm in cfg.vms:
        row = evals.where(f"vm = '{vm.name}' AND method = 'fm'").first()
        days = scored.where(f"vm = '{vm.name}'").toPandas()  # tiny
        p = days["teacher_score"].clip(LOGLOSS_EPS, 1 - LOGLOSS_EPS).to_numpy()
        y = days[vm.label].to_numpy()
        base = traffic.where(f"vm = '{vm.name}'").agg({vm.label: "avg"}).first()[0]  # the training day's CTR
        logloss = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
        assert row.n == len(days) and row.teacher_snapshot_id == days["teacher_snapshot_id"].iloc[0]
        assert row.ne == pytest.approx(logloss / entropy(base), rel=1e-5), vm.name
        assert row.calibration == pytest.approx(p.mean() / y.mean(), rel=1e-5), vm.name
        assert row.model_ds == "2026-01-01" and row.fm_staleness_days == 0


def test_evaluate_reruns_idempotently_and_refuses_a_broken_chain(spark, two_days):
    import pandas as pd

    from jobs import evaluate, quality
    from jobs.config import parse_ds
    from tests.test_ingest import checksum

    cfg, _ = two_days
    day = parse_ds(DAYS[1])
    table = DeltaTable.forPath(spark, cfg.table(VM_EVAL))
    before = checksum(table.toDF().where("ds = '2026-01-02'"))
    evaluate.run(day, cfg, spark)
    quality.run(VM_EVAL, day, cfg, spark)
    assert checksum(table.toDF().where("ds = '2026-01-02'")) == before

    # The oracle NE is the LogLoss of the generator's true probabilities, by the same normaliser.
    row = table.toDF().where("ds = '2026-01-02' AND vm = 'video' AND method = 'none'").first()
    traffic = DeltaTable.forPath(spark, cfg.table("vm_traffic")).toDF()
    rows = traffic.where("ds = '2026-01-02' AND vm = 'video'").toPandas()  # tiny
    truth = pd.read_parquet(f"{cfg.truth}/ds=2026-01-02")
    joined = rows.merge(truth[["request_id", "p_click"]], on="request_id")
    p, y = joined["p_click"].to_numpy(), joined["click"].to_numpy()
    oracle_logloss = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert row.oracle_ne == pytest.approx(oracle_logloss * row.ne / row.logloss, rel=1e-6)

    # A (vm, method) whose chain has a hole is an error, not a silently missing row.
    snaps = DeltaTable.forPath(spark, cfg.table(VM_SNAPSHOTS))
    snaps.delete("vm = 'video' AND method = 'none' AND ds = '2026-01-02'")
    try:
        with pytest.raises(ValueError, match="no video/none snapshot trained through 2026-01-02"):
            evaluate.run("2026-01-03", cfg, spark)
    finally:
        snaps.restoreToVersion(snaps.history(2).collect()[1]["version"])


@pytest.mark.parametrize(
    ("uri", "remote", "master"),
    [
        ("sc://spark-connect:15010", "sc://spark-connect:15010", "local[2]"),  # Spark Connect
        ("spark://spark-master:7077", None, "spark://spark-master:7077"),  # a driver per task
    ],
)
def test_spark_default_connection_says_where_the_jobs_spark_is(monkeypatch, tmp_path, uri, remote, master):
    from dags.exfm_common import with_spark_connection

    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", uri)
    spark = with_spark_connection(tiny_config(tmp_path)).spark
    assert (spark.remote, spark.master) == (remote, master)


def test_bad_data_fails_the_task_at_once_and_other_errors_are_retried():
    """A contract or quality failure cannot pass on a retry: AirflowFailException skips the
    task's retries; any other error (a lost executor, a Delta conflict) keeps them."""
    from airflow.sdk.exceptions import AirflowFailException

    from dags.exfm_common import bad_data_fails_at_once
    from jobs.ingest import ContractError
    from jobs.quality import QualityError

    for error in (ContractError("landing file x: column click: must be 0 or 1"), QualityError("table t")):

        @bad_data_fails_at_once
        def step(error=error):
            raise error

        with pytest.raises(AirflowFailException, match=str(error)):
            step()

    @bad_data_fails_at_once
    def transient():
        raise ConnectionError("executor lost")

    with pytest.raises(ConnectionError):
        transient()
