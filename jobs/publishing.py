"""Snapshot publishing (paper §3.2): the Snapshot Publishing DB, blessing, the pointer, GC.

- Publisher (end of train_fm): the snapshot files are written and verified first, then one
  row is MERGEd into ``fm_snapshots``. The row is the only way a snapshot becomes visible, so a
  crash before it leaves nothing visible and the next run publishes cleanly.
- Blessing (beyond the paper): a new snapshot is scored on the holdout slice of its own day
  (requests the FM never trains on) next to the snapshot the pointer held for that day; if its
  NE is worse by more than a tolerance it is ``rejected`` and never becomes eligible.
- Updater: moves ``fm_pointer`` to the newest eligible snapshot by compare-and-set, or extends
  its lease. Delta's optimistic concurrency turns a race into a failed commit, which is retried.
- Resolution for a day (the DAS): the newest eligible snapshot with
  trained_through_ds <= ds - 1 - freeze_days, as the pointer held it for that day, so a
  backfill replays history. A snapshot trained on ds itself would leak labels and is refused.
- GC: deletes the files of snapshots that no pointer holds, whose lease has expired and that
  are not among the newest K.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass

from jobs import faults, snapshots
from jobs.config import ExfmConfig, parse_ds
from jobs.lakehouse import (
    FM_DATASET,
    FM_POINTER,
    FM_SNAPSHOTS,
    delta_conflicts,
    render_sql,
    table_ref,
    table_stamp,
)

log = logging.getLogger(__name__)
PUBLISHED, BLESSED, REJECTED = "published", "blessed", "rejected"
CAS_ATTEMPTS = 20


class LeakageError(ValueError):
    """The DAS was asked to score day t with an FM that already trained on day t."""


class NoSnapshotError(LookupError):
    """No eligible FM snapshot exists for a day."""


@dataclass(frozen=True)
class SnapshotRow:
    snapshot_id: str
    trained_through_ds: str
    uri: str
    sha256: str
    status: str
    holdout_ne: float | None
    reference_snapshot_id: str | None
    reference_ne: float | None
    n_examples: int | None
    train_loss: float | None
    created_at: dt.datetime
    collected_at: dt.datetime | None

    @property
    def day(self) -> dt.date:
        return dt.date.fromisoformat(self.trained_through_ds)


def ensure_tables(cfg: ExfmConfig, spark) -> None:
    spark.sql(render_sql("fm_snapshots_create", fm_snapshots=table_ref(cfg, FM_SNAPSHOTS)))
    spark.sql(render_sql("fm_pointer_create", fm_pointer=table_ref(cfg, FM_POINTER)))


def _sql(spark, cfg: ExfmConfig, statement: str, **args):
    return spark.sql(
        render_sql(
            statement, fm_snapshots=table_ref(cfg, FM_SNAPSHOTS), fm_pointer=table_ref(cfg, FM_POINTER)
        ),
        args=args,
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)  # Spark runs in UTC (jobs/spark.py)


def list_snapshots(cfg: ExfmConfig, spark) -> list[SnapshotRow]:
    """Every row of fm_snapshots, newest day first (small: one row per trained day).

    A day's steps ask a dozen times, and each read is two Spark jobs: the rows are read once per
    table version (time travel to it) and kept, keyed by the log's stamp, until the table changes.
    """
    uri = cfg.table(FM_SNAPSHOTS)
    stamp = table_stamp(cfg, FM_SNAPSHOTS)
    if stamp is None or table_stamp(cfg, FM_POINTER) is None:  # the pointer's readers come next
        ensure_tables(cfg, spark)
        stamp = table_stamp(cfg, FM_SNAPSHOTS)
    cached = _read_snapshots.get(uri)
    if cached is None or cached[0] != stamp:
        df = spark.read.format("delta").option("versionAsOf", stamp[0]).load(uri)
        rows = [SnapshotRow(**row.asDict()) for row in df.collect()]
        rows.sort(key=lambda r: r.trained_through_ds, reverse=True)
        cached = _read_snapshots[uri] = (stamp, rows)
    return list(cached[1])


_read_snapshots: dict[str, tuple[tuple[int, int], list[SnapshotRow]]] = {}  # uri -> (stamp, rows)


def eligible_statuses(cfg: ExfmConfig) -> tuple[str, ...]:
    return (BLESSED,) if cfg.das.blessing.enabled else (PUBLISHED, BLESSED)


# --- publisher ----------------------------------------------------------------------------
def publish(ds: str | dt.date, cfg: ExfmConfig, spark, *, now: dt.datetime | None = None) -> dict:
    """Verify the FM snapshot files of ``ds``, bless them, then append their row (idempotent)."""
    day = parse_ds(ds)
    uri = snapshots.fm_uri(cfg, day)
    snap = snapshots.load(uri)  # raises unless the files are complete and match their sha256
    sha = snap.meta["sha256"]
    snapshot_id = f"fm-{day.isoformat()}-{sha[:12]}"
    existing = {r.trained_through_ds: r for r in list_snapshots(cfg, spark)}.get(day.isoformat())
    if existing is not None and existing.sha256 == sha:
        log.info("snapshot %s is already published (%s)", snapshot_id, existing.status)
        return _summary(existing) | {"new": False}

    blessing = {"holdout_ne": None, "reference_snapshot_id": None, "reference_ne": None}
    status = PUBLISHED
    if cfg.das.blessing.enabled:
        blessing = bless(snap, day, cfg, spark)
        status = BLESSED if blessing.pop("passed") else REJECTED

    with faults.delta_write(FM_SNAPSHOTS, cfg.table(FM_SNAPSHOTS)):
        _sql(
            spark,
            cfg,
            "fm_snapshots_publish",
            snapshot_id=snapshot_id,
            trained_through_ds=day.isoformat(),
            uri=uri,
            sha256=sha,
            n_examples=snap.meta["n_examples"],
            train_loss=snap.meta["train_loss"],
            status=status,
            created_at=now or _now(),
            **blessing,
        )
    row = next(r for r in list_snapshots(cfg, spark) if r.snapshot_id == snapshot_id)
    log.info("published %s: %s", snapshot_id, status)
    return _summary(row) | {"new": True}


def bless(snap: snapshots.Snapshot, day: dt.date, cfg: ExfmConfig, spark) -> dict:
    """NE of the new snapshot and of the snapshot the pointer held for ``day``, on day's holdout.

    NE here is normalised by the holdout's own click rate, so 1.0 is what predicting that rate
    scores: with no reference yet (the first day), the new snapshot must beat it.
    """
    new_ne = holdout_ne(snap, day, cfg, spark)
    try:
        ref = resolve_for_day(day, cfg, spark, freeze_days=0)
    except NoSnapshotError:
        ref = None
    ref_ne = 1.0
    if ref is not None:
        ref_ne = holdout_ne(load(ref), day, cfg, spark)
    passed = new_ne <= ref_ne + cfg.das.blessing.ne_tolerance
    log.info(
        "blessing fm ds=%s: holdout NE %.4f vs %.4f (%s) -> %s",
        day,
        new_ne,
        ref_ne,
        ref.snapshot_id if ref else "base rate",
        "blessed" if passed else "rejected",
    )
    return {
        "holdout_ne": new_ne,
        "reference_snapshot_id": ref.snapshot_id if ref else None,
        "reference_ne": ref_ne,
        "passed": passed,
    }


def holdout_ne(snap: snapshots.Snapshot, day: dt.date, cfg: ExfmConfig, spark) -> float:
    from jobs.train_fm import build_model
    from jobs.training import day_batches, evaluate
    from models.data import FeatureEncoder

    model = build_model(snap.meta["model_config"])
    model.load_state_dict(snap.state["model"])
    encoder = FeatureEncoder.from_state(snap.meta["encoder"])
    batches = day_batches(
        spark, cfg, FM_DATASET, day, encoder, label=snap.meta["label"], batch_size=4096, holdout="only"
    )
    return evaluate(model, batches, train_base_rate=snap.meta["train_ctr"])["ne_eval_base"]


def load(row: SnapshotRow) -> snapshots.Snapshot:
    """The files of a published snapshot, checked against the sha256 its row recorded."""
    if row.collected_at is not None:
        raise snapshots.SnapshotError(
            f"FM snapshot {row.snapshot_id} was deleted by gc-snapshots at {row.collected_at}; "
            "raise das.keep_last to keep snapshots a backfill needs"
        )
    snap = snapshots.load(row.uri)
    if snap.meta["sha256"] != row.sha256:
        raise snapshots.SnapshotError(
            f"FM snapshot {row.snapshot_id}: the files at {row.uri} have sha256 {snap.meta['sha256']}, "
            f"fm_snapshots recorded {row.sha256} (the day was retrained; publish it again)"
        )
    return snap


# --- resolution (the loader's side) ---------------------------------------------------------
def resolve_for_day(
    ds: str | dt.date,
    cfg: ExfmConfig,
    spark,
    *,
    freeze_days: int | None = None,
    snapshot_id: str | None = None,
) -> SnapshotRow:
    """The FM snapshot that scores day ``ds``: the one the pointer held for that day.

    That is the newest eligible snapshot with trained_through_ds <= ds - 1 - freeze_days.
    ``snapshot_id`` pins one explicitly; it must still be eligible and must not leak.
    """
    day = parse_ds(ds)
    freeze = cfg.das.freeze_days if freeze_days is None else freeze_days
    rows = list_snapshots(cfg, spark)
    if snapshot_id is not None:
        row = next((r for r in rows if r.snapshot_id == snapshot_id), None)
        if row is None:
            raise NoSnapshotError(f"fm_snapshots has no snapshot {snapshot_id!r}")
        check_no_leakage(row, day)
        if row.status not in eligible_statuses(cfg):
            raise NoSnapshotError(f"FM snapshot {snapshot_id} is {row.status}, not eligible for the DAS")
        return row

    cutoff = (day - dt.timedelta(days=1 + freeze)).isoformat()
    eligible = [r for r in rows if r.status in eligible_statuses(cfg)]
    candidates = [r for r in eligible if r.trained_through_ds <= cutoff]
    if not candidates:
        leaking = sorted(r.snapshot_id for r in eligible if r.trained_through_ds >= day.isoformat())
        hint = f"; {leaking} trained through ds >= {day} and would leak that day's labels" if leaking else ""
        raise NoSnapshotError(
            f"no eligible FM snapshot trained through {cutoff} or earlier for ds={day} "
            f"(freeze_days={freeze}){hint}"
        )
    row = candidates[0]  # rows are newest first
    check_no_leakage(row, day)
    return row


def teacher_for_day(ds: str | dt.date, cfg: ExfmConfig, spark) -> SnapshotRow | None:
    """``resolve_for_day``, or None when no eligible snapshot exists for the day: the VMs
    cold-start (before the first FM, or when every earlier FM was rejected by blessing)."""
    try:
        return resolve_for_day(ds, cfg, spark)
    except NoSnapshotError:
        return None


def in_fm_warmup(ds: str | dt.date, cfg: ExfmConfig, spark) -> bool:
    """True while the FM has trained fewer than ``fm.warmup_days`` days before ds: the VMs wait."""
    if not cfg.fm.warmup_days:
        return False
    day = parse_ds(ds)
    return sum(r.day < day for r in list_snapshots(cfg, spark)) < cfg.fm.warmup_days


def check_no_leakage(row: SnapshotRow, day: dt.date) -> None:
    if row.day >= day:
        raise LeakageError(
            f"FM snapshot {row.snapshot_id} trained through {row.trained_through_ds}: scoring ds={day} "
            f"with it would leak day {day}'s labels; the DAS needs trained_through_ds < {day}"
        )


# --- updater --------------------------------------------------------------------------------
def read_pointer(cfg: ExfmConfig, spark, name: str | None = None):
    """(snapshot_id, lease_expires_at, updated_at) of a pointer, or None before the first update."""
    from pyspark.sql import functions as F

    ensure_tables(cfg, spark)
    name = name or cfg.das.pointer
    rows = spark.read.format("delta").load(cfg.table(FM_POINTER)).where(F.col("name") == name).collect()
    return rows[0] if rows else None


def update_pointer(cfg: ExfmConfig, spark, *, now: dt.datetime | None = None) -> dict:
    """Move the pointer to the newest eligible snapshot (compare-and-set), else extend its lease."""
    races = delta_conflicts()
    name = cfg.das.pointer
    for attempt in range(CAS_ATTEMPTS):
        stamp = now or _now()
        current = read_pointer(cfg, spark, name)
        eligible = [r for r in list_snapshots(cfg, spark) if r.status in eligible_statuses(cfg)]
        eligible = [r for r in eligible if r.collected_at is None]
        if not eligible:
            return {"pointer": name, "action": "none", "snapshot_id": current and current.snapshot_id}
        target = eligible[0].snapshot_id
        expected = current.snapshot_id if current else ""
        action = "extend" if target == expected else "move"
        try:
            with faults.delta_write(FM_POINTER, cfg.table(FM_POINTER)):
                metrics = _sql(
                    spark,
                    cfg,
                    "fm_pointer_cas",
                    name=name,
                    expected_snapshot_id=expected,
                    snapshot_id=target,
                    lease_expires_at=stamp + dt.timedelta(hours=cfg.das.lease_hours),
                    now=stamp,
                ).first()
        except races as e:  # another updater committed first
            log.info("pointer %s: lost a race (%s), retrying", name, type(e).__name__)
            time.sleep(0.05 * (attempt + 1))
            continue
        if metrics["num_affected_rows"] == 1:
            log.info("pointer %s: %s -> %s", name, action, target)
            return {"pointer": name, "action": action, "snapshot_id": target, "previous": expected or None}
        log.info("pointer %s changed since it was read, retrying", name)  # CAS condition false
    raise RuntimeError(f"fm_pointer {name}: no compare-and-set succeeded in {CAS_ATTEMPTS} attempts")


# --- garbage collection ---------------------------------------------------------------------
def gc_snapshots(cfg: ExfmConfig, spark, *, now: dt.datetime | None = None, dry_run: bool = False) -> dict:
    """Delete files of snapshots no pointer holds, with an expired lease, older than the newest K.

    ``dry_run``: only say which would go (and their bytes).
    """
    from pyspark.sql import functions as F

    now = now or _now()
    rows = list_snapshots(cfg, spark)
    held = {r.snapshot_id for r in spark.read.format("delta").load(cfg.table(FM_POINTER)).collect()}
    history = (
        spark.sql(f"DESCRIBE HISTORY {table_ref(cfg, FM_POINTER)}").select("version", "timestamp").collect()
    )
    since = now - dt.timedelta(hours=cfg.maintenance.retention_hours)
    start = min((h.version for h in history if h.timestamp >= since), default=max(h.version for h in history))
    leases = {
        r.snapshot_id: r.lease_expires_at
        for r in _sql(
            spark, cfg, "fm_snapshots_leases", fm_pointer=cfg.table(FM_POINTER), start_version=start
        ).collect()
    }
    newest = {r.snapshot_id for r in rows[: cfg.das.keep_last]}
    doomed = [
        r
        for r in rows
        if r.collected_at is None
        and r.snapshot_id not in held | newest
        and (leases.get(r.snapshot_id) is None or leases[r.snapshot_id] <= now)
    ]
    if dry_run:
        sizes = {r.snapshot_id: snapshots.size(r.uri) for r in doomed}
        return {"collected": sorted(sizes), "dry_run": True, "bytes": sum(sizes.values())}
    if doomed:
        _sql(spark, cfg, "fm_snapshots_collect", ids=[r.snapshot_id for r in doomed], now=now)
    # Files of every collected row go, also those of an earlier GC that died after marking.
    collected = (
        spark.read.format("delta").load(cfg.table(FM_SNAPSHOTS)).where(F.col("collected_at").isNotNull())
    )
    sizes = {r.uri: snapshots.size(r.uri) for r in collected.collect()}
    deleted = [uri for uri in sizes if snapshots.delete(uri)]
    kept = [r.snapshot_id for r in rows if r.collected_at is None and r not in doomed]
    return {
        "collected": [r.snapshot_id for r in doomed],
        "deleted_dirs": deleted,
        "kept": kept,
        "bytes": sum(sizes[uri] for uri in deleted),
    }


def _summary(row: SnapshotRow) -> dict:
    return {
        "snapshot_id": row.snapshot_id,
        "trained_through_ds": row.trained_through_ds,
        "status": row.status,
        "holdout_ne": row.holdout_ne,
        "reference_snapshot_id": row.reference_snapshot_id,
        "reference_ne": row.reference_ne,
        "uri": row.uri,
    }
