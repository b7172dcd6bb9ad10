"""The fault matrix: every writer of a day killed (SIGKILL) at each of its failpoints, then re-run.

Two worlds of the same tiny synthetic days: world A runs day 1, world B starts as a copy of it
(`study.copy_run`). In world A day 2 runs undisturbed, step by step, and the content of every
table after each step is the reference. In world B each step of day 2 is first run as a real
`exfm` process killed at a failpoint (jobs/faults.py: before any file, after its files and before
the commit, after the commit; a Delta writer at the last two, see KILLS), once per point; after
each kill every table holds either what it held before the step or exactly the reference after
it (nothing partial is visible), and a snapshot either loads as the reference or does not exist
for a reader. Then the step runs to the end (a re-run from whatever the kills left) and its
tables equal world A's. Files a killed Delta writer left are referenced by no version: no reader
can pick them up (the maintenance DAG's VACUUM deletes them).
"""

import datetime as dt
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, TimestampType

from jobs import (
    das,
    evaluate,
    fm_dataset,
    ingest,
    maintenance,
    publishing,
    quality,
    snapshots,
    study,
    train_fm,
    train_vm,
)
from jobs.lakehouse import FM_DATASET, VM_EVAL, VM_TRAFFIC, VM_TRAINING
from tests.conftest import REPO, SHORT_LIVED, TINY, land_days, tiny_config
from tests.test_ingest import checksum

D1, D2 = dt.date(2026, 1, 1), dt.date(2026, 1, 2)
VM, METHOD = "feed", "ah_sa"
VOLATILE = ("data_docs", "quarantine")  # paths with the validation's wall-clock time in them

# Day 2, step by step: (step, the `exfm` arguments of its process, the writers killed in it).
STEPS = [
    ("ingest", ["ingest"], []),
    ("validate vm_traffic", ["validate", "--table", VM_TRAFFIC], [VM_TRAFFIC, "dq_results"]),
    ("build-fm-dataset", ["build-fm-dataset"], []),
    ("validate fm_dataset", ["validate", "--table", FM_DATASET], [FM_DATASET]),
    ("train-fm", ["train-fm"], ["snapshot/fm"]),
    ("publish", ["publish"], ["fm_snapshots"]),
    ("update-pointer", ["update-pointer"], ["fm_pointer"]),
    ("das-score", ["das-score"], ["_staging/vm_training"]),
    ("validate vm_training", ["validate", "--table", VM_TRAINING], []),
    ("train-vm", ["train-vm", "--vm", VM, "--method", METHOD], ["snapshot/vm", "vm_snapshots"]),
    ("evaluate", ["evaluate"], []),
    ("validate vm_eval", ["validate", "--table", VM_EVAL], [VM_EVAL]),
]
WHEN = ("before_files", "before_commit", "after_commit")
SNAPSHOT_WRITERS = ("snapshot/fm", "snapshot/vm")  # files and meta.json; every other writer is Delta
# A Delta writer killed before its files leaves the versions it leaves killed before its commit
# (its files, if any, are referenced by no version), and the re-run starts from less: its
# before_commit kill, which must land before the commit (asserted below), stands for both. Each
# kill is a cold `exfm` process, the costliest part of the matrix. A snapshot killed before its
# files differs (no directory vs a model file without meta.json): all three points.
KILLS = [
    (step, writer, when)
    for step, _, writers in STEPS
    for writer in writers
    for when in WHEN
    if writer in SNAPSHOT_WRITERS or when != "before_files"
]


def _run_step(step: str, cfg, spark) -> None:
    """The step in this process, to the end (what the DAG task runs)."""
    {
        "ingest": lambda: ingest.run(D2, cfg, spark),
        "validate vm_traffic": lambda: quality.run(VM_TRAFFIC, D2, cfg, spark),
        "build-fm-dataset": lambda: fm_dataset.run(D2, cfg, spark),
        "validate fm_dataset": lambda: quality.run(FM_DATASET, D2, cfg, spark),
        "train-fm": lambda: train_fm.run(D2, cfg, spark, publish=False),
        "publish": lambda: publishing.publish(D2, cfg, spark),
        "update-pointer": lambda: publishing.update_pointer(cfg, spark),
        "das-score": lambda: das.run(D2, cfg, spark),
        "validate vm_training": lambda: quality.run(VM_TRAINING, D2, cfg, spark),
        "train-vm": lambda: train_vm.run(D2, VM, cfg, spark, method=METHOD),
        "evaluate": lambda: evaluate.run(D2, cfg, spark),
        "validate vm_eval": lambda: quality.run(VM_EVAL, D2, cfg, spark),
    }[step]()


def _day_one(cfg, spark) -> None:
    land_days([D1, D2], cfg, spark)  # day 2's landing files and, on day 1, the whole start of the DAG
    train_fm.run(D1, cfg, spark)
    publishing.update_pointer(cfg, spark)
    train_vm.run(D1, VM, cfg, spark, method=METHOD)


def _content(spark, cfg, root, seen: dict) -> dict:
    """Every table's rows as a checksum, without wall-clock times and with paths relative to the world.

    A table whose Delta log has not changed since ``seen`` last read it holds the same rows (a
    version's content never changes): only the tables a step wrote are read again.
    """
    out = {}
    for t in maintenance.tables(cfg):
        log = Path(cfg.table(t)) / "_delta_log"
        key = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in log.iterdir())
        if seen.get(t, (None,))[0] != key:
            seen[t] = key, _checksum(spark, cfg.table(t), root)
        out[t] = seen[t][1]
    return out


def _checksum(spark, path: str, root) -> tuple[int, int]:
    df = spark.read.format("delta").load(path)
    cols = []
    for field in df.schema.fields:
        if isinstance(field.dataType, TimestampType) or field.name in VOLATILE:
            continue
        col = F.col(f"`{field.name}`")
        if isinstance(field.dataType, StringType):
            col = F.replace(col, F.lit(f"file:{root}"), F.lit("")).alias(field.name)
            col = F.replace(col, F.lit(str(root)), F.lit("")).alias(field.name)
        cols.append(col)
    return checksum(df.select(*cols))


def _snapshot(cfg, writer: str) -> str:
    return snapshots.fm_uri(cfg, D2) if writer == "snapshot/fm" else snapshots.vm_uri(cfg, VM, METHOD, D2)


@pytest.fixture(scope="module")
def worlds(spark, tmp_path_factory):
    a_root, b_root = tmp_path_factory.mktemp("undisturbed"), tmp_path_factory.mktemp("killed") / "world"
    a, b = tiny_config(a_root), tiny_config(b_root)
    _day_one(a, spark)
    study.copy_run(a, b, spark)  # world B: a copy of A's day one, its snapshots' URIs at its own files
    reference, seen_a = {}, {}
    for step, _, _ in STEPS:
        _run_step(step, a, spark)
        reference[step] = _content(spark, a, a_root, seen_a)
    reference["snapshots"] = {
        w: snapshots.read_meta(_snapshot(a, w))["sha256"] for w in ("snapshot/fm", "snapshot/vm")
    }
    return SimpleNamespace(
        a=a, b=b, root=b_root, reference=reference, done=[], matrix=[], content=None, seen={}
    )


def _advance(worlds, spark, upto: str | None) -> dict:
    """Run (to the end, in this process) every step of world B before ``upto`` not yet run; the
    content of the tables before ``upto``."""
    for step, _, _ in STEPS:
        if step == upto:
            break
        if step not in worlds.done:
            _run_step(step, worlds.b, spark)
            worlds.done.append(step)
            worlds.content = None
    if worlds.content is None:  # else: what the last kill (or re-run) left, read then
        worlds.content = _content(spark, worlds.b, worlds.root, worlds.seen)
    return worlds.content


# The killed steps run as processes forked from a server that has imported the CLI and its
# libraries once (multiprocessing's forkserver): each is still an `exfm` process of its own with
# its own Spark driver, as a task is, without spending seconds importing torch and GX first.
LAUNCHER = mp.get_context("forkserver")
LAUNCHER.set_forkserver_preload(["torch", "great_expectations", "pyspark.sql", "jobs.cli"])


def _exfm(argv: list[str], failpoint: str, log: str) -> None:
    """`exfm ARGV` in this (forked) process with the failpoint armed, its output into ``log``."""
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.environ["EXFM_FAILPOINT"] = failpoint
    from jobs.cli import main

    sys.exit(main(argv))


def _killed(worlds, args: list[str], failpoint: str) -> SimpleNamespace:
    day = [] if args[0] == "update-pointer" else ["--ds", D2.isoformat()]
    argv = [*args, *day, "--config", str(REPO / "exfm.yaml")]
    overrides = [*TINY, *SHORT_LIVED, f"lakehouse_root={worlds.root / 'lakehouse'}", "spark.master=local[1]"]
    for item in overrides:
        argv += ["--set", item]
    log = worlds.root / f"{failpoint.replace('/', '_')}.log"
    process = LAUNCHER.Process(target=_exfm, args=(argv, failpoint, str(log)))
    process.start()
    process.join(timeout=600)
    if process.exitcode is None:
        process.kill()
        process.join()
    return SimpleNamespace(returncode=process.exitcode, stderr=log.read_text())


@pytest.mark.parametrize("kill", KILLS, ids=[f"{w}@{when}" for _, w, when in KILLS])
def test_a_killed_writer_leaves_nothing_partial_and_the_rerun_recovers(spark, worlds, kill):
    step, writer, when = kill
    args = next(a for s, a, _ in STEPS if s == step)
    before = _advance(worlds, spark, step)
    done = _killed(worlds, args, f"{writer}@{when}")
    assert done.returncode == -9, f"{step} was not killed at {writer}@{when}:\n{done.stderr[-3000:]}"
    landed = "after_commit" if "after_commit" in done.stderr.rsplit("failpoint ", 1)[-1] else when
    if writer not in SNAPSHOT_WRITERS:  # its kill before the commit also stands for one before the files
        assert landed == when, f"{writer}@{when}: the commit came before the kill"

    # Nothing partial is visible: each table holds what it held before the step, or all of it.
    after = worlds.content = _content(spark, worlds.b, worlds.root, worlds.seen)
    reference = worlds.reference[step]
    partial = [t for t in after if after[t] not in (before.get(t), reference[t])]
    assert not partial, f"{writer}@{when}: {partial} hold neither the state before {step} nor after it"
    if writer.startswith("snapshot/"):  # a snapshot loads as the undisturbed one, or not at all
        uri = _snapshot(worlds.b, writer)
        if landed == "after_commit":
            assert snapshots.load(uri).meta["sha256"] == worlds.reference["snapshots"][writer]
        else:
            assert not snapshots.exists(uri)
            with pytest.raises(snapshots.SnapshotError):
                snapshots.load(uri)

    worlds.matrix.append({"step": step, "writer": writer, "failpoint": when, "landed": landed})
    if kill == next(k for k in reversed(KILLS) if k[0] == step):  # the step's last kill: re-run it
        _run_step(step, worlds.b, spark)
        worlds.done.append(step)
        worlds.content = _content(spark, worlds.b, worlds.root, worlds.seen)
        assert worlds.content == reference, f"{step} re-run after the kills"
        worlds.matrix[-1]["recovered"] = True


def test_every_step_ends_as_the_undisturbed_run(spark, worlds):
    _advance(worlds, spark, None)
    assert _content(spark, worlds.b, worlds.root, worlds.seen) == worlds.reference[STEPS[-1][0]]
    for writer, sha in worlds.reference["snapshots"].items():
        assert snapshots.load(_snapshot(worlds.b, writer)).meta["sha256"] == sha
    kills = len(worlds.matrix)
    steps = {m["step"] for m in worlds.matrix}
    recovered = {m["step"] for m in worlds.matrix if m.get("recovered")}
    print(json.dumps({"kills": kills, "steps_killed": len(steps), "steps_recovered": len(recovered)}))
    for m in worlds.matrix:
        print(json.dumps(m))
    assert kills == len(KILLS) and recovered == steps
