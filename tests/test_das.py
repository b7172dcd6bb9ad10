"""The DAS and snapshot publishing on real Spark + Delta: parity, leakage, idempotency, pointer, GC.

Tests share one small world and run in file order: later ones add snapshots (days 3, 4),
move pointers and finally garbage-collect.
"""

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs import das, freshness, ingest, publishing, quality, report, snapshots, train_fm
from jobs.config import ENV_PREFIX
from jobs.lakehouse import FM_DATASET, FM_POINTER, FM_SNAPSHOTS, VM_TRAFFIC, VM_TRAINING, read_day
from models.data import FeatureEncoder
from tests.conftest import REPO, SHORT_LIVED, TINY, land_days, tiny_config
from tests.test_dags import airflow_env
from tests.test_ingest import checksum

DAYS = [dt.date(2026, 1, 1) + dt.timedelta(days=i) for i in range(4)]
# Two tasks (paper Table 5): video's label is a like, so the FM has a click head and a like head.
TASKS = ["vms.2.label=like", "vms.2.task=like"]


@pytest.fixture(scope="module")
def world(spark, tmp_path_factory):
    """4 days of traffic and FM datasets; the FM trained and published through days 1-2."""
    root = tmp_path_factory.mktemp("das")
    cfg = tiny_config(root, *TASKS)
    land_days(DAYS, cfg, spark)
    for day in DAYS[:2]:
        assert train_fm.run(day, cfg, spark)["published"]["status"] == "blessed"
    publishing.update_pointer(cfg, spark)
    return root, cfg


def _cli(root, *args, env_extra=None):
    """The exfm CLI in its own process (its own Spark driver), on the world's tables."""
    argv = [sys.executable, "-m", "jobs.cli", *args, "--config", str(REPO / "exfm.yaml")]
    for item in [
        *TINY,
        *TASKS,
        *SHORT_LIVED,
        f"lakehouse_root={root / 'lakehouse'}",
        "spark.master=local[1]",
    ]:
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def test_teacher_scores_equal_direct_torch_scores(spark, world):
    _, cfg = world
    day = DAYS[1]
    out = das.run(day, cfg, spark)
    gate = quality.run(VM_TRAINING, day, cfg, spark)
    assert gate["success"] and gate["published"]["operation"] == "replaceWhere"
    row = publishing.resolve_for_day(day, cfg, spark)
    assert out["snapshot_id"] == row.snapshot_id and row.trained_through_ds == "2026-01-01"

    # The same snapshot in plain torch over the day's merged requests (tiny: collected here).
    snap = snapshots.load(row.uri)
    assert snap.meta["labels"] == ["click", "like"] and set(snap.meta["train_rates"]) == {"click", "like"}
    model = train_fm.build_model(snap.meta["model_config"])
    model.load_state_dict(snap.state["model"])
    model.eval()
    requests = read_day(spark, cfg, FM_DATASET, day).toPandas()
    with torch.no_grad():
        encoder = FeatureEncoder.from_state(snap.meta["encoder"])
        heads = (
            torch.sigmoid(das.teacher_logits(model, encoder, pa.table(requests))).double().numpy()
        )  # (N, 2)
    direct = {
        label: dict(zip(requests["request_id"], heads[:, k], strict=True))
        for k, label in enumerate(["click", "like"])
    }

    scored = read_day(spark, cfg, VM_TRAINING, day).toPandas()
    traffic = read_day(spark, cfg, VM_TRAFFIC, day)
    assert len(scored) == traffic.count()  # every VM row of the day, nothing else
    assert set(scored["teacher_snapshot_id"]) == {row.snapshot_id}
    # Each VM's rows carry its task's head: the click head for feed and search, the like head
    # for video; the other head's scores are not theirs.
    for vm in cfg.vms:
        rows = scored[scored["vm"] == vm.name]
        other = "click" if vm.label == "like" else "like"
        diff = np.abs(rows["teacher_score"].to_numpy() - rows["request_id"].map(direct[vm.label]).to_numpy())
        assert diff.max() < 1e-6, (vm.name, diff.max())
        swapped = np.abs(rows["teacher_score"].to_numpy() - rows["request_id"].map(direct[other]).to_numpy())
        assert swapped.mean() > 1e-3, (vm.name, swapped.mean())
    assert np.allclose(1 / (1 + np.exp(-scored["teacher_logit"])), scored["teacher_score"], atol=1e-6)
    # A request several VMs saw is scored once: one score per request, fewer requests than rows.
    assert out["requests_scored"] == requests.shape[0] < len(scored)
    assert (scored.groupby(["request_id", "vm"]).size() == 1).all()
    click_rows = scored[scored["vm"] != "video"]
    assert (click_rows.groupby("request_id")["teacher_score"].nunique() == 1).all()


def test_lineage_names_the_rows_a_vm_and_its_teacher_trained_on(spark, world):
    """Each snapshot records the Delta version of what it read: time travel gives those rows back,
    also after the day was scored and published again."""
    import json

    from jobs import lineage, train_vm
    from jobs.lakehouse import table_version
    from jobs.training import in_holdout

    root, cfg = world
    day = DAYS[1]  # scored and published by the test above
    train_vm.run(day, "feed", cfg, spark, method="ah", fresh=True)
    out = lineage.run(cfg, spark, vm="feed", method="ah", ds=day)

    def rows(trained_on):  # the recorded table, day (and VM) at the recorded version
        df = read_day(
            spark, cfg, trained_on["table"], dt.date.fromisoformat(trained_on["ds"]), trained_on["version"]
        )
        return df.where(df.vm == trained_on["vm"]) if "vm" in trained_on else df

    seen = out["vm_snapshot"]["trained_on"]
    assert (seen["table"], seen["ds"], seen["vm"]) == (VM_TRAINING, str(day), "feed")
    assert rows(seen).count() == out["vm_snapshot"]["n_examples"]
    teacher = out["teacher"]
    assert teacher["snapshot_id"] == publishing.resolve_for_day(day, cfg, spark).snapshot_id
    assert teacher["trained_on"]["table"] == FM_DATASET and teacher["trained_on"]["ds"] == str(DAYS[0])
    fm_ids = rows(teacher["trained_on"]).select("request_id").toPandas()["request_id"]
    # The FM skips its blessing holdout.
    assert (~in_holdout(pa.array(fm_ids), cfg)).sum() == teacher["n_examples"]
    assert teacher["continued_from"] == []  # the FM's first day

    before = checksum(rows(seen))
    das.run(day, cfg, spark)
    quality.run(VM_TRAINING, day, cfg, spark)
    assert table_version(cfg, VM_TRAINING) > seen["version"]
    assert checksum(rows(seen)) == before
    printed = _cli(root, "lineage", "--vm", "feed", "--method", "ah", "--ds", str(day))
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert json.loads(printed.stdout.splitlines()[-1]) == json.loads(json.dumps(out, default=str))


def test_model_loads_once_per_python_worker(spark, world):
    root, _ = world
    cfg = tiny_config(root, *TASKS, "das.batch_size=50")  # many batches per task
    spark.conf.set("spark.sql.shuffle.partitions", "8")  # 8 scoring tasks on 2 cores
    spark.conf.set("spark.sql.adaptive.coalescePartitions.enabled", "false")
    try:
        # Day 3's teacher (the FM of day 2) is one no Python worker has loaded yet: the workers
        # that scored day 2 before are still there, holding day 1's.
        out = das.run(DAYS[2], cfg, spark)
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", "2")
        spark.conf.unset("spark.sql.adaptive.coalescePartitions.enabled")
    assert out["score_batches"] >= 8 * 3, out
    assert 1 <= out["model_loads"] <= 2, out  # local[2]: at most two Python workers


def test_leakage_guard_refuses_and_writes_nothing(spark, world):
    _, cfg = world
    version = _version(spark, cfg, VM_TRAINING)
    # Day 1: the only eligible snapshots trained through day 1 or later.
    with pytest.raises(publishing.NoSnapshotError, match="would leak that day's labels"):
        das.run(DAYS[0], cfg, spark)
    # Pinning the snapshot trained through day 2 to score day 2.
    leaking = publishing.resolve_for_day(DAYS[2], cfg, spark).snapshot_id
    with pytest.raises(publishing.LeakageError, match="trained through 2026-01-02: scoring ds=2026-01-02"):
        das.run(DAYS[1], cfg, spark, snapshot_id=leaking)
    assert _version(spark, cfg, VM_TRAINING) == version
    assert read_day(spark, cfg, VM_TRAINING, DAYS[0]).isEmpty()


def test_freeze_days_scores_with_a_staler_snapshot(spark, world):
    _, cfg = world
    assert publishing.resolve_for_day(DAYS[2], cfg, spark).trained_through_ds == "2026-01-02"
    assert publishing.resolve_for_day(DAYS[2], cfg, spark, freeze_days=1).trained_through_ds == "2026-01-01"


def _score(day, cfg, spark) -> dict:
    """das-score, then its gate (which publishes with one replaceWhere): the publish's result."""
    das.run(day, cfg, spark)
    return quality.run(VM_TRAINING, day, cfg, spark)["published"]


def test_staleness_alarm_fires_on_a_stale_teacher_only(spark, world):
    root, cfg = world
    cfg = cfg.model_copy(update={"das": cfg.das.model_copy(update={"max_staleness_days": 1})})
    assert freshness.run(DAYS[0], cfg, spark)["teacher"] is None  # no FM before day 1: nothing to be stale
    fresh = freshness.run(DAYS[2], cfg, spark)  # taught by the FM of day 2: 1 day old
    assert fresh["fm_staleness_days"] == 1 and fresh["teacher"].startswith("fm-2026-01-02-")
    with pytest.raises(freshness.StaleTeacherError) as stale:  # day 4, still the FM of day 2
        freshness.run(DAYS[3], cfg, spark)
    message = str(stale.value)
    assert "2026-01-04" in message and "2 days old" in message and "das.max_staleness_days=1" in message
    assert "no FM trained on the last 1 day(s)" in message and "NE" in message

    # The day's report carries the alarm as a banner; a fresh day's does not.
    page = report.run(DAYS[3], cfg, spark)["report"]
    assert "class='alarm'" in open(page).read() and "2 days old" in open(page).read()
    assert "class='alarm'" not in open(report.run(DAYS[2], cfg, spark)["report"]).read()

    # Through Airflow: the DAG's task fails without retries and the configured notifier hears it.
    sent = root / "alerts.jsonl"
    env = {
        **airflow_env(root),
        **{
            ENV_PREFIX + k.upper().replace(".", "__"): v
            for k, v in (i.split("=", 1) for i in (*TINY, *TASKS, *SHORT_LIVED))
        },
        "EXFM__LAKEHOUSE_ROOT": str(root / "lakehouse"),
        "EXFM__SPARK__MASTER": "local[1]",
        "EXFM__DAS__MAX_STALENESS_DAYS": "1",
        "EXFM__ALERTS__NOTIFIERS": f"[{{class: tests.notifier.FileNotifier, args: {{path: '{sent}'}}}}]",
    }
    done = subprocess.run(
        [sys.executable, "-c", ALARM_RUNNER, *(str(d) for d in DAYS[2:])],
        env=env,
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
    )
    states = [line for line in done.stdout.splitlines() if line.startswith("STATE ")]
    assert states == ["STATE 2026-01-03 success", "STATE 2026-01-04 failed"], (
        done.stdout[-3000:] + done.stderr[-3000:]
    )
    alerts = [json.loads(line) for line in sent.read_text().splitlines()]
    assert len(alerts) == 1 and alerts[0]["message"] == "teacher_freshness failed on 2026-01-04"
    assert "stale FM teacher for ds=2026-01-04" in alerts[0]["error"]


# One task of the DAG, through Airflow's own dag.test, for each day given.
ALARM_RUNNER = """
import os, subprocess, sys
from pathlib import Path
import pendulum
airflow = str(Path(sys.executable).with_name("airflow"))
subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True)
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).get_dag("exfm_daily")
dag = dag.partial_subset(task_ids=["teacher_freshness"], include_upstream=False)
for ds in sys.argv[1:]:
    run = dag.test(logical_date=pendulum.parse(ds))
    print("STATE", ds, run.get_task_instance("teacher_freshness").state, flush=True)
"""


def test_rerun_is_one_commit_with_the_same_content(spark, world):
    _, cfg = world
    day = DAYS[1]
    _score(day, cfg, spark)
    before = checksum(read_day(spark, cfg, VM_TRAINING, day))
    version = _version(spark, cfg, VM_TRAINING)
    out = _score(day, cfg, spark)
    assert checksum(read_day(spark, cfg, VM_TRAINING, day)) == before
    history = _history(spark, cfg, VM_TRAINING, after=version)
    assert [h["operation"] for h in history] == ["WRITE"] and out["version"] == history[0]["version"]
    scored = read_day(spark, cfg, VM_TRAINING, day)
    assert scored.count() == scored.select("vm", "request_id").distinct().count()

    # A row that left vm_traffic (a re-ingest) leaves vm_training on the next run.
    from delta.tables import DeltaTable

    gone = read_day(spark, cfg, VM_TRAFFIC, day).where("vm = 'feed'").first()["request_id"]
    DeltaTable.forPath(spark, cfg.table(VM_TRAFFIC)).delete(
        f"ds = '{day}' AND vm = 'feed' AND request_id = '{gone}'"  # test-owned literal values
    )
    try:
        _score(day, cfg, spark)
        assert (
            read_day(spark, cfg, VM_TRAINING, day).where(f"request_id = '{gone}' AND vm = 'feed'").isEmpty()
        )
    finally:
        ingest.run(day, cfg, spark)
        quality.run(VM_TRAFFIC, day, cfg, spark)
        _score(day, cfg, spark)
    assert checksum(read_day(spark, cfg, VM_TRAINING, day)) == before


def test_writers_of_different_days_do_not_conflict(spark, world):
    _, cfg = world
    errors, results = [], {}

    def score(day):
        try:
            results[day] = das.run(day, cfg, spark)
            quality.run(VM_TRAINING, day, cfg, spark)  # staging and publishing per day
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=score, args=(day,)) for day in DAYS[1:3]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert {r["trained_through_ds"] for r in results.values()} == {"2026-01-01", "2026-01-02"}
    for day in DAYS[1:3]:
        assert read_day(spark, cfg, VM_TRAINING, day).count() == read_day(spark, cfg, VM_TRAFFIC, day).count()


def test_killed_publisher_leaves_no_snapshot_and_next_run_publishes(spark, world):
    root, cfg = world
    day = DAYS[2]
    train_fm.run(day, cfg, spark, publish=False)  # files written, row not yet appended
    killed = _cli(
        root, "publish", "--ds", str(day), env_extra={"EXFM_FAILPOINT": "fm_snapshots@before_files"}
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "2026-01-03" not in {r.trained_through_ds for r in publishing.list_snapshots(cfg, spark)}
    assert publishing.resolve_for_day(DAYS[3], cfg, spark).trained_through_ds == "2026-01-02"

    ok = _cli(root, "publish", "--ds", str(day))
    assert ok.returncode == 0, ok.stderr[-2000:]
    again = publishing.publish(day, cfg, spark)  # idempotent: same snapshot, no second row
    rows = [r for r in publishing.list_snapshots(cfg, spark) if r.trained_through_ds == "2026-01-03"]
    assert len(rows) == 1 and rows[0].snapshot_id == again["snapshot_id"] and not again["new"]
    assert rows[0].status == "blessed"
    assert publishing.resolve_for_day(DAYS[3], cfg, spark).snapshot_id == rows[0].snapshot_id


def test_broken_snapshot_is_rejected_and_the_pointer_stays(spark, world):
    _, cfg = world
    day = DAYS[3]
    assert publishing.update_pointer(cfg, spark)["snapshot_id"].startswith("fm-2026-01-03-")
    train_fm.run(day, cfg, spark, publish=False)
    uri = snapshots.fm_uri(cfg, day)
    good = snapshots.load(uri)
    broken = {**good.state, "model": {k: torch.zeros_like(v) for k, v in good.state["model"].items()}}
    snapshots.save(uri, broken, {k: v for k, v in good.meta.items() if k not in ("sha256", "model_file")})

    out = publishing.publish(day, cfg, spark)
    assert out["status"] == "rejected" and out["holdout_ne"] > out["reference_ne"], out
    assert out["reference_snapshot_id"].startswith("fm-2026-01-03-")
    kept = publishing.update_pointer(cfg, spark)
    assert (kept["action"], kept["snapshot_id"]) == ("extend", out["reference_snapshot_id"])

    train_fm.run(day, cfg, spark)  # retrained correctly: the day's row is replaced
    rows = [r for r in publishing.list_snapshots(cfg, spark) if r.trained_through_ds == "2026-01-04"]
    assert [r.status for r in rows] == ["blessed"]
    assert publishing.update_pointer(cfg, spark)["action"] == "move"


def test_racing_updaters_move_the_pointer_once(spark, world):
    root, _ = world
    cfg = tiny_config(root, *TASKS, "das.pointer=race")
    results, errors = [], []
    barrier = threading.Barrier(2)

    def update():
        try:
            barrier.wait()
            results.append(publishing.update_pointer(cfg, spark))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=update) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    newest = publishing.list_snapshots(cfg, spark)[0].snapshot_id
    assert sorted(r["action"] for r in results) == ["extend", "move"], results
    pointer = publishing.read_pointer(cfg, spark)
    assert pointer.snapshot_id == newest

    later = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(hours=1)
    assert publishing.update_pointer(cfg, spark, now=later)["action"] == "extend"
    extended = publishing.read_pointer(cfg, spark)
    assert extended.snapshot_id == newest and extended.lease_expires_at > pointer.lease_expires_at


def test_gc_keeps_held_leased_and_newest_snapshots(spark, world):
    root, _ = world
    cfg = tiny_config(root, *TASKS, "das.keep_last=1")
    rows = publishing.list_snapshots(cfg, spark)
    assert [r.trained_through_ds for r in rows] == ["2026-01-04", "2026-01-03", "2026-01-02", "2026-01-01"]
    # Day 1 was never held (the first update went straight to day 2); days 2 and 3 were held
    # by pointer "fm" less than 24 h ago, so their leases still protect them.
    assert publishing.gc_snapshots(cfg, spark)["collected"] == [rows[3].snapshot_id]

    day_after = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(hours=25)
    out = publishing.gc_snapshots(cfg, spark, now=day_after)
    assert sorted(out["collected"]) == sorted(r.snapshot_id for r in rows[1:3])  # day 4 is held and newest
    assert [snapshots.exists(r.uri) for r in rows] == [True, False, False, False]
    pointers = spark.read.format("delta").load(cfg.table(FM_POINTER)).collect()
    assert {p.snapshot_id for p in pointers} == {rows[0].snapshot_id}

    with pytest.raises(snapshots.SnapshotError, match="deleted by gc-snapshots"):
        das.run(DAYS[2], cfg, spark)  # a backfill of day 3 needs the day-2 snapshot
    assert publishing.gc_snapshots(cfg, spark, now=day_after)["collected"] == []  # idempotent


def test_snapshot_rows_are_read_once_per_version_and_anew_when_the_table_is_remade(spark, world, tmp_path):
    _, world_cfg = world
    known = publishing.list_snapshots(world_cfg, spark)
    cfg = tiny_config(tmp_path)
    uri = cfg.table(FM_SNAPSHOTS)
    assert publishing.list_snapshots(cfg, spark) == []  # made the tables

    def append(row):
        schema = spark.read.format("delta").load(uri).schema
        spark.createDataFrame([vars(row)], schema=schema).write.format("delta").mode("append").save(uri)

    def spark_jobs(read):
        tracker, group = spark.sparkContext.statusTracker(), f"list-snapshots-{read}"
        spark.sparkContext.setJobGroup(group, "test")
        try:
            return publishing.list_snapshots(cfg, spark), tracker.getJobIdsForGroup(group)
        finally:
            spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)

    append(known[1])
    rows, jobs = spark_jobs("new version")
    assert rows == [known[1]] and jobs, "a new version is read"
    rows, jobs = spark_jobs("same version")
    assert rows == [known[1]] and not jobs, "the same version is not read again"
    append(known[0])
    assert publishing.list_snapshots(cfg, spark) == [known[0], known[1]]  # newest day first

    shutil.rmtree(uri)  # dropped and made again up to the same version, with other rows
    publishing.ensure_tables(cfg, spark)
    append(known[2])
    append(known[3])
    assert publishing.list_snapshots(cfg, spark) == [known[2], known[3]]


def test_cli_lists_snapshots_and_the_pointer(world):
    root, _ = world
    out = _cli(root, "snapshots")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[1].startswith("* fm-2026-01-04-") and "blessed" in lines[1]
    assert "deleted" in lines[-2] and lines[-1].startswith("pointer fm: fm-2026-01-04-")


def _version(spark, cfg, table):
    from delta.tables import DeltaTable

    return DeltaTable.forPath(spark, cfg.table(table)).history(1).first()["version"]


def _history(spark, cfg, table, *, after):
    from delta.tables import DeltaTable

    rows = DeltaTable.forPath(spark, cfg.table(table)).history().where(f"version > {int(after)}").collect()
    return sorted((r.asDict() for r in rows), key=lambda h: h["version"])
