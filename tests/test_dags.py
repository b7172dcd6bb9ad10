"""The Airflow DAG: parses light, is wired as expected, and runs a real day with dag.test()."""

import json
import os
import subprocess
import sys

from delta.tables import DeltaTable

from jobs import generate
from tests.conftest import REPO, TINY, tiny_config

RUNNER = """
import json, sys, pendulum
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
heavy = sorted(m for m in ("torch", "pyspark", "jobs") if m in sys.modules)
dag = bag.get_dag("exfm_daily")
structure = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
run = dag.test(logical_date=pendulum.datetime(2026, 1, 1, tz="UTC"))
states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
print("RESULT " + json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "heavy": heavy,
                              "structure": structure, "run": str(run.state), "states": states}))
"""


def test_dag_parses_light_and_runs_a_day(spark, tmp_path):
    cfg = tiny_config(tmp_path)
    generate.run("2026-01-01", cfg)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "EXFM_CONFIG": str(REPO / "exfm.yaml"),
        "EXFM__LAKEHOUSE_ROOT": cfg.lakehouse_root,
        "EXFM__LANDING_ROOT": cfg.landing_root,
        "EXFM__TRUTH_ROOT": cfg.truth_root,
    }
    for item in TINY:  # the same tiny data as the rest of the suite
        key, value = item.split("=", 1)
        env["EXFM__" + key.upper().replace(".", "__")] = value
    airflow = os.path.join(os.path.dirname(sys.executable), "airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, cwd=tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(REPO / "dags")],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["errors"] == {}
    assert result["heavy"] == []  # nothing heavy at parse time
    assert result["structure"] == {
        "ingest_traffic": ["build_fm_dataset"],
        "build_fm_dataset": ["train_fm"],
        "train_fm": [],
    }
    assert result["run"] == "success" and set(result["states"].values()) == {"success"}, result
    for table in ("vm_traffic", "fm_dataset"):
        assert DeltaTable.forPath(spark, cfg.table(table)).toDF().where("ds = '2026-01-01'").count() > 0
    assert (tmp_path / "lakehouse" / "snapshots" / "fm" / "ds=2026-01-01" / "meta.json").exists()
