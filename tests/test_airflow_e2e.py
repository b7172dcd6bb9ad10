"""End to end: the real Airflow services (`./exfm airflow-local`) backfill three days of exfm_daily.

A Spark Connect server, scheduler, api-server and dag-processor run in a temporary AIRFLOW_HOME with
the metadata DB on Postgres (`airflow-local --postgres`), on loopback and free ports, with the
repository's dags/ and a one-VM tiny config; every task is a Spark Connect client of the one
server. `airflow backfill create` makes the runs, the REST API v2 reports them, and the Delta
tables of every task that ran are checked. Then the middle day is cleared and run again. Beside
all of it the same days run one by one (`exfm demo`, dag.test per day, in one process with its own
local driver) into a second lakehouse: the re-run and the demo must leave exactly the tables the
backfill left, so Spark Connect and a classic driver write the same tables.
Also a static check of docker/docker-compose.yaml (no Docker engine needed).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import yaml
from delta.tables import DeltaTable

from jobs import generate
from jobs.config import load_config
from jobs.lakehouse import (
    DQ_RESULTS,
    FM_DATASET,
    FM_SNAPSHOTS,
    VM_EVAL,
    VM_SNAPSHOTS,
    VM_TRAFFIC,
    VM_TRAINING,
)
from tests.conftest import REPO, stop_group
from tests.test_ingest import checksum

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]
COMPONENTS = ("spark-server", "api-server", "scheduler", "dag-processor")
TIMEOUT_S = 40 * 60  # ~15 tasks a day, two at a time: minutes on a busy machine
# Each table's key: a re-run must replace, never add, rows.
KEYS = {
    VM_TRAFFIC: ["ds", "vm", "request_id"],
    FM_DATASET: ["ds", "request_id"],
    VM_TRAINING: ["ds", "vm", "request_id"],
    FM_SNAPSHOTS: ["trained_through_ds"],
    VM_SNAPSHOTS: ["ds", "vm", "method"],
    VM_EVAL: ["ds", "vm", "method"],
    DQ_RESULTS: ["ds", "table", "suite"],
}
# Columns that say when or where a row was written, not what it holds.
VOLATILE = ["created_at", "collected_at", "validated_at", "uri", "snapshot_uri", "data_docs", "quarantine"]


def _write_config(tmp: Path) -> Path:
    """exfm.yaml shrunk to one VM and tiny days (as conftest.TINY), every path under ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((REPO / "exfm.yaml").read_text())
    raw["vms"] = [vm := next(v for v in raw["vms"] if v["name"] == "video")]
    ranges = raw.get("quality", {}).get("dense_ranges")
    if ranges:  # the gates' ranges may name only the VM's own dense features
        raw["quality"]["dense_ranges"] = {k: r for k, r in ranges.items() if k in vm["dense"]}
    raw["synthetic"].update(rows_per_day=1500, rows_per_file=1000, users=300, ads=100, duplicate_rate=0.01)
    raw["synthetic"]["base_ctr"] = {"video": raw["synthetic"]["base_ctr"]["video"]}
    # The Spark Connect server lives through every task of the run: it keeps the optimising JIT.
    raw["spark"].update(master="local[2]", shuffle_partitions=2, interpreted_projections=True)
    # No Spark UI: a driver starts faster and opens no port. No adaptive re-planning of tiny days.
    raw["spark"]["conf"].update({"spark.ui.enabled": "false", "spark.sql.adaptive.enabled": "false"})
    raw["das"]["blessing"].update(holdout_fraction=0.2, ne_tolerance=0.05)
    for name in ("lakehouse", "landing", "truth"):
        raw[f"{name}_root"] = str(tmp / name)
    path = tmp / "exfm-e2e.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    """The REST API v2 with a JWT from /auth/token (the simple auth manager, everyone admin)."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"
        self.token = ""

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            self.base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def wait_until_up(self, deadline: float, services: subprocess.Popen) -> None:
        while time.monotonic() < deadline and services.poll() is None:
            try:
                self.token = self.call("GET", "/auth/token")["access_token"]
                return
            except OSError:
                time.sleep(2)
        raise AssertionError("the api-server did not come up")


def _task_logs(home: Path, tis: list[dict]) -> str:
    """The log files of the task instances that failed or wait for a retry."""
    text = []
    for ti in tis:
        if ti["state"] in ("failed", "up_for_retry", "upstream_failed"):
            run = home / "logs" / "dag_id=exfm_daily" / f"run_id={ti['dag_run_id']}"
            folder = run / f"task_id={ti['task_id']}"
            for log in sorted(folder.rglob("*.log")):
                text.append(f"--- {log.relative_to(home)}\n{log.read_text()[-6000:]}")
    return "\n".join(text) or "(no task log)"


def _component_logs(home: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(home.glob("*.log")))


def _airflow_cli(env: dict, *args: str) -> None:
    done = subprocess.run([str(REPO / "exfm"), "airflow", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _wait_for_success(api: Api, home: Path, services: subprocess.Popen, deadline: float) -> tuple[list, list]:
    """Poll the REST API until every day's run succeeded; a task that failed for good fails the test."""
    while True:
        runs = api.call("GET", "/api/v2/dags/exfm_daily/dagRuns?limit=100")["dag_runs"]
        tis = api.call("GET", "/api/v2/dags/exfm_daily/dagRuns/~/taskInstances?limit=100")["task_instances"]
        states = {r["logical_date"][:10]: r["state"] for r in runs}
        # Retries are the DAG's answer to transient errors (each task is idempotent); a task that
        # failed for good ends the wait at once.
        broken = [ti for ti in tis if ti["state"] in ("failed", "upstream_failed")]
        if broken or "failed" in states.values():
            raise AssertionError(f"runs {states}\n{_task_logs(home, tis)}")
        if len(runs) >= len(DAYS) and set(states.values()) == {"success"}:
            return runs, tis
        if time.monotonic() > deadline or services.poll() is not None:
            raise AssertionError(f"runs {states} after {TIMEOUT_S} s\n{_component_logs(home)}")
        time.sleep(5)


def _tables(spark, cfg) -> dict:
    """Per table: its content checksum (without VOLATILE columns), after checking its key is unique."""
    content = {}
    for table, key in KEYS.items():
        df = DeltaTable.forPath(spark, cfg.table(table)).toDF()
        duplicated = df.groupBy(*key).count().where("count > 1").limit(3).collect()
        assert not duplicated, f"{table}: duplicated {key}: {duplicated}"
        content[table] = checksum(df.drop(*VOLATILE))
    pointer = DeltaTable.forPath(spark, cfg.table("fm_pointer")).toDF().collect()
    content["fm_pointer"] = sorted((r["name"], r["snapshot_id"]) for r in pointer)
    return content


def _durations(tis: list[dict]) -> str:
    """Seconds per task and day, and from the first start to the last end: where the time goes."""
    rows = sorted(
        (ti["logical_date"][:10], ti["start_date"] or "", ti["task_id"], ti["duration"] or 0) for ti in tis
    )
    ran = [ti for ti in tis if ti["start_date"] and ti["end_date"]]
    stamps = [dt.datetime.fromisoformat(ti[k]) for ti in ran for k in ("start_date", "end_date")]
    wall = (max(stamps) - min(stamps)).total_seconds() if stamps else 0.0
    lines = [f"{ds} {task:<18} {seconds:6.1f}s" for ds, _, task, seconds in rows]
    return "\n".join([*lines, f"{sum(r[3] for r in rows):.0f} task-seconds in {wall:.0f} s"])


@pytest.mark.e2e
@pytest.mark.timeout(TIMEOUT_S + 5 * 60)
def test_backfill_three_days_in_airflow(spark, tmp_path, request):
    config = _write_config(tmp_path)
    cfg = load_config(config, env={})
    for ds in DAYS:
        generate.run(ds, cfg)
    # AIRFLOW_HOME (with Postgres's data dir) outside pytest's 0700 tree: run as root, the server
    # runs as the postgres user, which must be able to reach it.
    home, port = Path(tempfile.mkdtemp(prefix="exfm-e2e-airflow-")), _free_port()
    home.chmod(0o711)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "EXFM__", "EXFM_CONFIG"))}
    env.update(
        AIRFLOW_HOME=str(home),
        EXFM_AIRFLOW_PORT=str(port),
        EXFM_SPARK_PORT=str(_free_port()),
        EXFM_POSTGRES_PORT=str(_free_port()),
        EXFM_CONFIG=str(config),
        EXFM_CATCHUP="False",  # the DAG's catchup: only the backfill makes runs
        EXFM__SPARK__JARS_CACHE=os.environ.get("EXFM__SPARK__JARS_CACHE", "~/.cache/exfm/jars"),
        SPARK_LOCAL_IP="127.0.0.1",  # the tasks' Spark drivers bind loopback only
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",  # a token without a password
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",
        # The days are in the past: no scheduled run for "today", the backfill's runs only.
        AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",
        AIRFLOW__CORE__PARALLELISM="2",  # two tasks at a time on two cores
        AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG="2",
        # Parsed once at start; re-parsing the file would only take CPU from the tasks.
        AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="600",
    )
    # The same days one by one (the README's demo: dag.test() per day, in one process with its own
    # local driver) into a second lakehouse: it shares nothing with the Airflow run, so it runs
    # beside it (the scheduler's waits leave it CPU) and is compared with it at the end.
    day_by_day, t0 = _write_config(tmp_path / "day_by_day"), time.monotonic()
    with open(tmp_path / "day_by_day.log", "w") as log:
        demo = subprocess.Popen(
            [str(REPO / "exfm"), "demo", "--config", str(day_by_day), "--start", DAYS[0], "--days", "3"],
            env={**env, "AIRFLOW_HOME": str(tmp_path / "day_by_day" / "airflow")},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )
    request.addfinalizer(lambda: stop_group(demo))  # however the test ends
    # Its own process group, so that the finally below stops every process it started.
    services = subprocess.Popen(
        [str(REPO / "exfm"), "airflow-local", "--postgres", *COMPONENTS],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    api, deadline = Api(port), time.monotonic() + TIMEOUT_S
    try:
        api.wait_until_up(deadline, services)
        while True:  # until the dag-processor has serialized the DAG
            try:
                api.call("GET", "/api/v2/dags/exfm_daily")
                break
            except urllib.error.HTTPError as e:
                errors = api.call("GET", "/api/v2/importErrors")["import_errors"]
                assert e.code == 404 and not errors and time.monotonic() < deadline, errors
                time.sleep(2)
        api.call("PATCH", "/api/v2/dags/exfm_daily", {"is_paused": False})  # tasks of a paused DAG never run
        _airflow_cli(
            env,
            *["backfill", "create", "--dag-id", "exfm_daily", "--from-date", DAYS[0], "--to-date", DAYS[-1]],
            # One day at a time: the FM chain and the DAS of day t need day t-1 done; a DAG with
            # depends_on_past must say what happens to days that already ran (here: none did).
            *["--max-active-runs", "1", "--reprocess-behavior", "completed"],
        )

        created = time.monotonic()
        runs, tis = _wait_for_success(api, home, services, deadline)
        assert (home / "postgres" / "PG_VERSION").exists() and not (home / "airflow.db").exists()  # Postgres
        ran = time.monotonic() - created
        print(f"services up and backfill created: {created - t0:.0f} s; its {len(DAYS)} days: {ran:.0f} s")
        print(_durations(tis))
        backfilled = _tables(spark, cfg)

        # Clear the middle day, as a user does after a bad run: the scheduler runs it again.
        _airflow_cli(
            env, "tasks", "clear", "exfm_daily", "--yes", "--start-date", DAYS[1], "--end-date", DAYS[1]
        )
        cleared = time.monotonic()
        _, rerun_tis = _wait_for_success(api, home, services, deadline)
        print(f"clear and re-run of {DAYS[1]} in {time.monotonic() - cleared:.0f} s:")
        print(_durations(rerun_tis))
    finally:
        stop_group(services)
        logs = tmp_path / "airflow-logs"  # kept with the test's files; the rest goes
        shutil.copytree(home, logs, ignore=shutil.ignore_patterns("postgres"), dirs_exist_ok=True)
        shutil.rmtree(home, ignore_errors=True)

    retried = sorted({f"{ti['dag_run_id']}: {ti['task_id']}" for ti in tis if ti["try_number"] > 1})
    if retried:  # passed, but say so: a retry can hide a race between tasks
        warnings.warn(f"exfm_daily tasks that needed a retry: {retried}", stacklevel=1)
    # The backfill's three runs and nothing else (no catchup, no scheduled run of today).
    assert sorted(r["logical_date"][:10] for r in runs) == DAYS, runs
    assert {r["run_type"] for r in runs} == {"backfill"}, runs
    assert {ti["state"] for ti in tis if ti["dag_run_id"].startswith("backfill__2026-01-03")} == {"success"}
    # Day 1 has no FM to score with and no models of the day before to judge.
    days_of = {"vm_traffic": DAYS, "fm_dataset": DAYS, "vm_training": DAYS[1:], "vm_eval": DAYS[1:]}
    for table, days in days_of.items():
        rows = DeltaTable.forPath(spark, cfg.table(table)).toDF().groupBy("ds").count().collect()
        assert {str(r["ds"]) for r in rows if r["count"] > 0} == set(days), table
    assert (Path(cfg.table("reports")) / f"ds={DAYS[-1]}.html").exists()
    for ds in DAYS:
        assert (Path(cfg.snapshots) / "fm" / f"ds={ds}" / "meta.json").exists(), ds

    # The middle day ran again (every task of it, a new try), and left every table as it was:
    # later days still match it, and nothing was appended twice.
    def tries_of(tis: list[dict]) -> dict:
        day = [ti for ti in tis if ti["logical_date"][:10] == DAYS[1]]
        return {(ti["task_id"], ti["map_index"]): ti["try_number"] for ti in day}

    before, again = tries_of(tis), tries_of(rerun_tis)
    assert all(again[key] > tries for key, tries in before.items()), (before, again)
    assert _tables(spark, cfg) == backfilled

    # The same days one by one (the demo that ran beside the Airflow run) give the same tables.
    returncode = demo.wait(timeout=max(deadline - time.monotonic(), 60))
    log = (tmp_path / "day_by_day.log").read_text()
    assert returncode == 0, log[-8000:]
    days = re.findall(r"^\S+  exfm_daily: .*$", log, re.M)  # a line per day, with its seconds
    print("day-by-day demo, beside the Airflow run:", *days, sep="\n")
    assert _tables(spark, load_config(day_by_day, env={})) == backfilled


def test_compose_file_is_consistent():
    """What `docker compose config` cannot tell without the repository: paths, ports, secrets."""
    docker = REPO / "docker"
    text = (docker / "docker-compose.yaml").read_text()
    compose = yaml.safe_load(text)
    for name, service in compose["services"].items():
        if "build" in service:
            assert (docker / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (docker / source).exists() if source.startswith(".") else source in compose["volumes"]
        assert all(port.startswith("127.0.0.1:") for port in service.get("ports", [])), name  # loopback only
        assert set(service.get("depends_on", [])) <= set(compose["services"]), name
    # Every secret compose insists on is listed, empty, in the example .env.
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required <= set(re.findall(r"^(\w+)=$", (docker / ".env.example").read_text(), re.M))
    for line in (docker / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            assert all((REPO / src).exists() for src in line.split()[1:-1]), line
