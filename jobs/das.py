"""das-score: the Data Augmentation Service (paper §3.2, Figure 3) for one day.

1. Resolve the FM snapshot the pointer held for ds (``publishing.resolve_for_day``): trained
   through ds - 1 - freeze_days at the latest, never through ds (label leakage).
2. Merge the VMs' views of each request as the FM dataset does (sql/fm_dataset.sql), so a
   request several VMs saw is scored once, with the union of their features; features no VM
   of the request carries are absent for the FM too.
3. Score the requests in Spark with ``mapInArrow``: every Python worker loads the snapshot
   once (verified by sha256) and keeps it for all its batches and tasks. An FM with several
   tasks (heads) scores each request once for all of them.
4. Stage each VM's rows of the day with teacher_score / teacher_logit (of its label's head) /
   teacher_snapshot_id
   (``_staging/vm_training``, replaceWhere ds). The gate ``quality.run("vm_training", ...)``
   validates them (suite ``teacher_scores``) and publishes them with one replaceWhere of day ds
   in arrival order, so days can be scored and published in parallel and a re-run replaces
   the day.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import Iterator

from jobs import fm_dataset, publishing, quality, snapshots, train_fm
from jobs.config import ExfmConfig, parse_ds
from jobs.lakehouse import VM_TRAFFIC, VM_TRAINING, read_day

# teacher_logits: one per FM head (task); each VM's row takes its label's head.
# score_batch / model_load: 1 on the first row of each scored batch / of a worker's first batch
# after it loaded the snapshot. Counters that ride with the rows, because a Spark Connect
# client has no accumulators.
SCORE_SCHEMA = "request_id string, teacher_logits array<double>, score_batch byte, model_load byte"

# Per Python worker process: sha256 -> (model, encoder). Spark reuses a worker across tasks
# (spark.python.worker.reuse), so a snapshot is read and deserialised once per worker.
_TEACHER: dict[str, tuple] = {}


def _teacher(uri: str, sha256: str) -> tuple:
    """(model, encoder, loaded now) of the snapshot, loaded once per worker."""
    if sha256 in _TEACHER:
        return (*_TEACHER[sha256], False)
    from jobs.train_fm import build_model
    from models.data import FeatureEncoder

    snap = snapshots.load(uri)
    if snap.meta["sha256"] != sha256:
        raise snapshots.SnapshotError(f"{uri} holds sha256 {snap.meta['sha256']}, expected {sha256}")
    model = build_model(snap.meta["model_config"])
    model.load_state_dict(snap.state["model"])
    model.eval()
    _TEACHER.clear()  # one snapshot per worker at a time
    _TEACHER[sha256] = (model, FeatureEncoder.from_state(snap.meta["encoder"]))
    return (*_TEACHER[sha256], True)


def score_batches(batches: Iterator, *, uri: str, sha256: str, batch_size: int) -> Iterator:
    """mapInArrow body: Arrow batches of requests -> SCORE_SCHEMA (the snapshot's scores)."""
    import numpy as np
    import pyarrow as pa
    import torch

    with torch.no_grad():
        for rb in batches:
            for start in range(0, rb.num_rows, batch_size):
                model, encoder, loaded = _teacher(uri, sha256)  # in a task with rows only
                part = rb.slice(start, batch_size)
                logits = teacher_logits(model, encoder, part)  # (B, T)
                first = np.zeros(part.num_rows, np.int8)
                first[0] = 1
                yield pa.RecordBatch.from_pydict(
                    {
                        "request_id": part.column("request_id"),
                        "teacher_logits": _rows(logits.double().numpy()),
                        "score_batch": first,
                        "model_load": first * loaded,
                    }
                )


def _rows(values):
    """A (B, T) numpy array as an Arrow list column of B lists of T values, without a Python loop."""
    import numpy as np
    import pyarrow as pa

    n, t = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * t + 1, t, dtype=np.int32)), values.ravel())


def teacher_logits(model, encoder, batch):
    """The FM's logits (B, T) (float32, one per task) for an Arrow batch of requests; bare torch, no Spark."""
    cat, dense = encoder.encode(batch, update_stats=False)
    return model(cat, dense)["task_logits"]


def run(
    ds: str | dt.date,
    cfg: ExfmConfig,
    spark,
    *,
    freeze_days: int | None = None,
    snapshot_id: str | None = None,
) -> dict:
    from pyspark.sql import functions as F

    from models.data import FeatureEncoder

    day = parse_ds(ds)
    t0 = time.perf_counter()
    row = publishing.resolve_for_day(day, cfg, spark, freeze_days=freeze_days, snapshot_id=snapshot_id)
    snap = publishing.load(row)  # fail on the driver, before any task, if the files are wrong
    requests = fm_dataset.requests(cfg, spark, day, every_vm=True)
    columns = [c for c in FeatureEncoder.from_state(snap.meta["encoder"]).columns if c in requests.columns]

    t_score = time.perf_counter()
    scorer = functools.partial(score_batches, uri=row.uri, sha256=row.sha256, batch_size=cfg.das.batch_size)
    # Checkpointed: the staging write reads its source twice (range sample, write); the FM
    # scores each request once.
    scored = requests.select("request_id", *columns).mapInArrow(scorer, SCORE_SCHEMA).localCheckpoint()
    counts = scored.agg(
        F.count("*").alias("requests"),
        F.sum("score_batch").alias("batches"),
        F.sum("model_load").alias("loads"),
    ).first()
    scoring_s = time.perf_counter() - t_score
    n_requests = counts["requests"]
    # Each VM's rows get the head of its label (task): array index, 1-based, by VM name.
    heads = {vm.name: train_fm.head_of(snap.meta, vm.label, row.snapshot_id) + 1 for vm in cfg.vms}
    head = F.create_map(*[F.lit(x) for name, h in heads.items() for x in (name, h)])[F.col("vm")]

    traffic = read_day(spark, cfg, VM_TRAFFIC, day)
    source = (
        traffic.join(scored, "request_id")
        .withColumn("teacher_logit", F.element_at("teacher_logits", head))
        # The score from the logit in Spark (StrictMath): torch's float32 sigmoid rounds a value
        # differently in its vector and scalar loops, so it would depend on the batch layout.
        # Rounded to float32, the FM's precision (as its logits are): sums of such values are
        # exact in double, so a day's mean score does not depend on how Spark split the day.
        .withColumn("teacher_score", (1 / (1 + F.exp(-F.col("teacher_logit")))).cast("float").cast("double"))
        .drop("teacher_logits", "score_batch", "model_load")
        .withColumn("teacher_snapshot_id", F.lit(row.snapshot_id))
    )
    quality.stage(source, cfg, VM_TRAINING, day)
    rows = quality.staged_day(spark, cfg, VM_TRAINING, day).groupBy("vm").count().collect()
    scored.unpersist()
    seconds = time.perf_counter() - t0
    return {
        "ds": day.isoformat(),
        "snapshot_id": row.snapshot_id,
        "trained_through_ds": row.trained_through_ds,
        "fm_staleness_days": (day - row.day).days,
        "rows": {r["vm"]: r["count"] for r in sorted(rows)},
        "requests_scored": n_requests,
        "model_loads": counts["loads"] or 0,
        "score_batches": counts["batches"] or 0,
        "scoring_rows_per_s": round(n_requests / max(scoring_s, 1e-9)),
        "seconds": round(seconds, 2),
    }
