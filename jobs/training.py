"""What train_fm and train_vm share: the day-to-day chain, progress, streaming evaluation."""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from collections.abc import Iterator
from typing import Literal

from jobs import snapshots
from jobs.config import ExfmConfig
from jobs.lakehouse import DayFiles, arrow_day, read_day
from models.data import Batch, FeatureEncoder, stream_batches

log = logging.getLogger(__name__)


def previous_snapshot(parent_uri: str, day: dt.date, fresh: bool) -> str | None:
    """The snapshot day ``day`` continues from: the one trained through day - 1.

    None on the first day (no earlier snapshot) or when ``fresh``; an error when earlier
    snapshots exist but day - 1 is missing, because skipping a day silently breaks the chain.
    """
    if fresh:
        return None
    days = snapshots.trained_days(parent_uri)
    prev = day - dt.timedelta(days=1)
    if prev in days:
        return f"{parent_uri}/ds={prev.isoformat()}"
    earlier = [d for d in days if d < day]
    if earlier:
        raise ValueError(
            f"no snapshot trained through {prev} under {parent_uri} (latest earlier: {max(earlier)}); "
            f"train {prev} first, or start a new chain with --fresh"
        )
    return None


def resume(
    prev_uri: str | None, model_config: dict, encoder: FeatureEncoder, *, mutable: tuple[str, ...] = ()
) -> tuple[dict, FeatureEncoder, snapshots.Snapshot | None]:
    """(model config, encoder, snapshot) a day starts from; the snapshot is None on a fresh start.

    ``model_config`` and ``encoder`` are what today's config asks for. A continued day keeps
    the snapshot's encoder (its dense statistics) and architecture, and takes today's value of
    every ``mutable`` hyper-parameter; any other difference is an error, because the saved
    weights and optimizer state only fit the architecture they were trained with.
    """
    if prev_uri is None:
        return model_config, encoder, None
    prev = snapshots.load(prev_uri)
    saved_encoder = FeatureEncoder.from_state(prev.meta["encoder"])
    wanted = {f"encoder.{k}": getattr(encoder, k) for k in ("categorical", "dense", "buckets", "seed")}
    have = {f"encoder.{k}": getattr(saved_encoder, k) for k in ("categorical", "dense", "buckets", "seed")}
    wanted |= {k: v for k, v in model_config.items() if k not in mutable and k != "prior_ctr"}
    have |= {k: prev.meta["model_config"].get(k) for k in wanted if not k.startswith("encoder.")}
    for key, value in wanted.items():
        if _plain(have[key]) != _plain(value):
            raise ValueError(
                f"{key} is {_plain(value)} in the config but {_plain(have[key])} in the snapshot this day "
                f"continues ({prev_uri}): an architecture change needs a new chain, run with --fresh"
            )
    return prev.meta["model_config"] | {k: model_config[k] for k in mutable}, saved_encoder, prev


def _plain(value):
    return list(value) if isinstance(value, list | tuple) else value


def day_batches(
    spark,
    cfg: ExfmConfig,
    table: str,
    day: dt.date,
    encoder: FeatureEncoder,
    *,
    label: str | tuple[str, ...],
    batch_size: int,
    vm: str | None = None,
    teacher: str | None = None,
    update_stats: bool = False,
    holdout: Literal["exclude", "only"] | None = None,
    files: DayFiles | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[Batch]:
    """One day of a Delta table as encoded batches, in arrival order, one batch in memory.

    ``holdout`` drops (or keeps only) the blessing holdout slice of the day (see ``in_holdout``);
    ``files``: the day's files, when the caller listed them already (``lakehouse.day_files``);
    with their schema, ``spark`` may be None. ``shard`` (rank, world): the rank's slice of each
    batch of ``batch_size`` rows, ``ceil(batch_size / world)`` rows (the last batch's may be
    shorter or absent), so the ranks' step k together is the batch k of one process.
    """
    import pyarrow as pa

    from models.data import rebatch

    extra = [*((label,) if isinstance(label, str) else label), *([teacher] if teacher else [])]
    columns = [*encoder.columns, *extra, *(["request_id"] if holdout else [])]
    day_rows = arrow_day(spark, cfg, table, day, columns, vm=vm, files=files, dictionary=encoder.categorical)
    with day_rows as (rows, batches):
        if holdout is not None:
            keep = holdout == "only"
            batches = (
                rb.filter(pa.array(in_holdout(rb.column("request_id"), cfg) == keep)) for rb in batches
            )
        if shard is not None:
            rank, world = shard
            size = -(-batch_size // world)
            batches = (t.slice(rank * size, size) for t in rebatch(batches, batch_size))
            batches = (rb for t in batches for rb in t.to_batches())
            batch_size = size
        n = 0
        encoded = stream_batches(
            batches,
            encoder,
            label=label,
            batch_size=batch_size,
            teacher=teacher,
            update_stats=update_stats,
            background=True,
        )
        for batch in encoded:
            n += batch.size
            yield batch
        if not n and shard is None:  # a rank's share of a tiny day may be empty
            where = (f", vm={vm}" if vm else "") + (f" ({holdout} holdout)" if holdout else "")
            raise ValueError(f"{table} has no rows for ds={day}{where}")


def in_holdout(request_ids, cfg: ExfmConfig):
    """Whether each request is in the FM's blessing holdout (a seeded hash of request_id), as numpy bools.

    A request is in or out on every day and in every table, so the FM never trains on the rows
    its snapshot is blessed on.
    """
    from models.data import hash_strings

    buckets = 10_000
    share = round(cfg.das.blessing.holdout_fraction * buckets)
    return hash_strings(request_ids, cfg.seeds.train) % buckets < share


def config_args(model_config: dict) -> dict:
    """A model config read back from meta.json: JSON lists become the dataclasses' tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in model_config.items()}


def save_day(
    uri: str,
    state: dict,
    *,
    day: dt.date,
    prev_uri: str | None,
    model,
    model_config: dict,
    encoder: FeatureEncoder,
    label: str,
    progress: Progress,
    train_ctr: float,
    **extra,
) -> dict:
    """Write the snapshot of a trained day; returns the summary the CLI prints."""
    from models.layers import num_parameters

    meta = snapshots.save(
        uri,
        state,
        kind="vm" if "vm" in extra else "fm",
        meta={
            **extra,
            "trained_through_ds": day.isoformat(),
            "continued_from": prev_uri,
            "model_config": model_config,
            "encoder": encoder.state_dict(),
            "label": label,
            "n_examples": progress.rows,
            "train_loss": progress.mean_loss,
            "train_ctr": train_ctr,  # the label's mean over the pass: the model's NE normaliser
            "parameters": num_parameters(model),
        },
    )
    keep = ("vm", "method", "snapshot", "sha256", "n_examples", "train_loss", "parameters", "continued_from")
    # The pass over the day (read, encode, train), without the job's setup and bookkeeping.
    timing = {"train_seconds": round(progress.seconds, 3)}
    return {"ds": day.isoformat(), "snapshot": uri} | {k: meta[k] for k in keep if k in meta} | timing


def day_ctr(spark, cfg: ExfmConfig, table: str, day: dt.date, label: str, vm: str | None = None) -> float:
    """Click rate of a day (one small Spark aggregate): the prior a fresh model starts from."""
    from pyspark.sql import functions as F

    df = read_day(spark, cfg, table, day)
    if vm is not None:
        df = df.where(F.col("vm") == vm)
    rate = df.agg(F.avg(label)).first()[0]
    if rate is None:
        raise ValueError(f"{table} has no rows for ds={day}" + (f", vm={vm}" if vm else ""))
    return min(max(float(rate), 1e-4), 1 - 1e-4)


class Progress:
    """A progress bar on a terminal, a log line every few seconds otherwise."""

    def __init__(self, desc: str, every_s: float = 10.0):
        self.desc, self.every_s = desc, every_s
        self.rows, self.loss_sum, self.batches = 0, 0.0, 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, unit=" rows", unit_scale=True, file=sys.stderr)

    def update(self, rows: int, loss: float) -> None:
        self.rows += rows
        self.loss_sum += loss * rows
        self.batches += 1
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(rows)
            self.bar.set_postfix(loss=f"{self.mean_loss:.4f}", refresh=False)
        elif now - self.last >= self.every_s:
            self.last = now
            log.info("%s: %d rows, %.0f rows/s, loss %.4f", self.desc, self.rows, self.rate, self.mean_loss)

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.rows if self.rows else float("nan")

    @property
    def rate(self) -> float:
        return self.rows / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        self.seconds = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.close()
        log.info("%s: done, %d rows, %.0f rows/s, loss %.4f", self.desc, self.rows, self.rate, self.mean_loss)


def evaluate(model, batches: Iterator[Batch], *, train_base_rate: float) -> dict:
    """Streaming NE / AUC / LogLoss / calibration of a model's serving logit over batches (labels (B,));
    rows without a label (a task the request's VMs do not log) are left out."""
    import torch

    from models.metrics import StreamingBinaryMetrics

    metrics = StreamingBinaryMetrics()
    model.eval()
    with torch.no_grad():
        for batch in batches:
            p = torch.sigmoid(model(batch.categorical, batch.dense)["logit"])
            labelled = ~torch.isnan(batch.label)
            metrics.update(p=p[labelled], y=batch.label[labelled])
    model.train()
    return metrics.compute(train_base_rate=train_base_rate)
