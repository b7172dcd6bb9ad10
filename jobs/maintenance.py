"""maintenance: what a lakehouse run every day for months needs once a week (DAG `exfm_maintenance`).

Every step takes the maintenance day ``ds`` (retention by data day is measured from it, so a
backfilled lakehouse ages by its days, not by when it was written) and ``dry_run``: list what
would go and remove nothing. Each returns what it removed (or would), with the bytes.

- ``compact_and_vacuum``: Delta ``OPTIMIZE`` of the bookkeeping tables (small files from daily
  MERGEs) and ``VACUUM`` of every table, with ``maintenance.retention_hours`` set as the table's
  ``delta.deletedFileRetentionDuration`` (Delta 4 ignores a RETAIN clause; at least its 7 days:
  the safety check stays on, so a reader or a backfill pinned to a version inside the retention
  still time-travels). The day tables are not compacted: each day is written once, in
  range-sorted files that training reads directly in arrival order, which bin-packing would undo.
- ``staging``: staged days older than ``staging_days`` that were published (a staged day that
  never passed its gate stays until someone fixes it).
- ``quarantine``: failed attempts of days older than ``quarantine_days``.
- ``scratch``: ``_scratch`` directories a killed reader left (older than ``scratch_hours``).
- ``fm_snapshots``: the FM's snapshot GC (``publishing.gc_snapshots``: held, leased, newest K stay).
- ``vm_snapshots``: per (vm, method), the newest ``keep_vm_snapshots`` and every snapshot of the
  last ``snapshot_days`` days stay (a backfill of those days resumes from them); the others'
  rows go from vm_snapshots, then their files, and directories with no row older than that.
- ``data_docs``: GX validation results and their Data Docs pages of days older than
  ``data_docs_days``; the site's index is rebuilt.

    exfm maintenance --ds 2026-02-01 [--dry-run]
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from jobs import publishing
from jobs.config import ExfmConfig, parse_ds
from jobs.lakehouse import (
    DQ_RESULTS,
    FM_DATASET,
    FM_POINTER,
    FM_SNAPSHOTS,
    SCRATCH,
    VM_EVAL,
    VM_SNAPSHOTS,
    VM_TRAFFIC,
    VM_TRAINING,
    filesystem,
    is_delta,
    render_sql,
    table_properties,
    table_ref,
    table_version,
    tree_bytes,
)

log = logging.getLogger(__name__)

DAY_TABLES = (VM_TRAFFIC, FM_DATASET, VM_TRAINING)  # one replaceWhere per day, arrival-ordered files
BOOKKEEPING = (FM_SNAPSHOTS, FM_POINTER, VM_SNAPSHOTS, VM_EVAL, DQ_RESULTS)  # many small MERGE commits


def run(ds: str | dt.date, cfg: ExfmConfig, spark, *, dry_run: bool = False, steps=None) -> dict:
    """Every maintenance step (or those of ``steps``) for the maintenance day ``ds``."""
    steps = steps or list(STEPS)
    if unknown := set(steps) - set(STEPS):
        raise ValueError(f"unknown maintenance steps {sorted(unknown)}; choose from {list(STEPS)}")
    out = {"ds": parse_ds(ds).isoformat(), "dry_run": dry_run}
    for step in steps:
        out[step] = STEPS[step](ds, cfg, spark, dry_run=dry_run)
    out["bytes"] = sum(v.get("bytes", 0) for v in out.values() if isinstance(v, dict))
    return out


def tables(cfg: ExfmConfig) -> list[str]:
    """Every Delta table of the lakehouse that exists: the published ones and their staging copies."""
    from jobs.quality import staging_table

    names = [*DAY_TABLES, *BOOKKEEPING, *(staging_table(t) for t in DAY_TABLES)]
    return [t for t in names if is_delta(cfg.table(t))]


def compact_and_vacuum(ds, cfg: ExfmConfig, spark, *, dry_run: bool = False, only=None) -> dict:
    """OPTIMIZE the bookkeeping tables, then VACUUM every table (``only``: these tables)."""
    hours = cfg.maintenance.retention_hours
    out, total = {}, 0
    for table in only or tables(cfg):
        ref = table_ref(cfg, table)
        done = {}
        if table in BOOKKEEPING and not dry_run:
            metrics = spark.sql(render_sql("maintenance_optimize", table=ref)).first()["metrics"]
            done["compacted"] = {
                "files_removed": metrics["numFilesRemoved"],
                "files_added": metrics["numFilesAdded"],
            }
        retention = f"interval {int(hours)} hours"
        if (
            not dry_run
            and table_properties(spark, cfg, table).get("delta.deletedFileRetentionDuration") != retention
        ):
            spark.sql(render_sql("maintenance_retention", table=ref, hours=str(int(hours))))
        # DRY RUN lists the files VACUUM deletes: their sizes first, then (for real) the deletion.
        doomed = [
            r[0] for r in spark.sql(render_sql("maintenance_vacuum", table=ref, dry_run="DRY RUN")).collect()
        ]
        size = _file_bytes(doomed)
        if doomed and not dry_run:
            spark.sql(render_sql("maintenance_vacuum", table=ref, dry_run=""))
        out[table] = done | {"vacuumed_files": len(doomed), "bytes": size}
        total += size
    return {"tables": out, "retention_hours": hours, "bytes": total}


def staging(ds, cfg: ExfmConfig, spark, *, dry_run: bool = False) -> dict:
    """Drop the staged days older than ``staging_days`` that their table published."""
    from jobs.quality import staging_table

    cutoff = (parse_ds(ds) - dt.timedelta(days=cfg.maintenance.staging_days)).isoformat()
    removed = {}
    for table in DAY_TABLES:
        staged = staging_table(table)
        if not is_delta(cfg.table(staged)) or table_version(cfg, table) is None:
            continue
        old = sorted(d for d in _days(spark, cfg, staged) & _days(spark, cfg, table) if d < cutoff)
        if old and not dry_run:  # one DELETE commit; the next VACUUM past the retention frees the files
            spark.sql(render_sql("staging_drop_days", staged=table_ref(cfg, staged)), args={"days": old})
        removed[table] = old
    return {"days": removed, "note": "files freed by the next VACUUM after the retention", "bytes": 0}


def quarantine(ds, cfg: ExfmConfig, spark=None, *, dry_run: bool = False) -> dict:
    """Delete the failed attempts (``_quarantine/<table>/ds=<D>/at=<t>``) of days past ``quarantine_days``."""
    from jobs.quality import QUARANTINE

    cutoff = parse_ds(ds) - dt.timedelta(days=cfg.maintenance.quarantine_days)
    attempts = _dirs(cfg.table(QUARANTINE), depth=3)  # <table>/ds=<D>/at=<time>
    doomed = [a.path for a in attempts if a.path.split("/")[-2].removeprefix("ds=") < cutoff.isoformat()]
    return _remove(cfg.table(QUARANTINE), doomed, dry_run)


def scratch(ds, cfg: ExfmConfig, spark=None, *, dry_run: bool = False) -> dict:
    """Delete ``_scratch`` directories older than ``scratch_hours`` (a reader killed mid-read left them)."""
    cutoff = time.time() - cfg.maintenance.scratch_hours * 3600
    old = [d.path for d in _dirs(cfg.table(SCRATCH)) if d.mtime.timestamp() < cutoff]
    return _remove(cfg.table(SCRATCH), old, dry_run)


def fm_snapshots(ds, cfg: ExfmConfig, spark, *, dry_run: bool = False) -> dict:
    """The FM's snapshot GC (``publishing.gc_snapshots``), with the bytes of what it deletes."""
    if table_version(cfg, FM_SNAPSHOTS) is None:
        return {"collected": [], "bytes": 0}
    return publishing.gc_snapshots(cfg, spark, dry_run=dry_run)


def vm_snapshots(ds, cfg: ExfmConfig, spark, *, dry_run: bool = False) -> dict:
    """Keep, per (vm, method), the newest ``keep_vm_snapshots`` and those of the last ``snapshot_days``."""
    m = cfg.maintenance
    cutoff = (parse_ds(ds) - dt.timedelta(days=m.snapshot_days)).isoformat()
    rows = []
    if table_version(cfg, VM_SNAPSHOTS) is not None:
        rows = (
            spark.read.format("delta")
            .load(cfg.table(VM_SNAPSHOTS))
            .select("vm", "method", "ds", "uri")
            .collect()
        )
    chains: dict[tuple[str, str], list] = {}
    for r in rows:
        chains.setdefault((r.vm, r.method), []).append(r)
    doomed = []
    for chain in chains.values():
        chain.sort(key=lambda r: r.ds, reverse=True)
        doomed += [r for r in chain[m.keep_vm_snapshots :] if r.ds < cutoff]
    # Directories without a row (a GC or a training killed before its upsert) of days past the cutoff.
    parent = f"{cfg.snapshots}/vm"
    known = {filesystem(r.uri.removeprefix("file:"))[1] for r in rows}
    dirs = [d.path for d in _dirs(parent, depth=3) if d.base_name.startswith("ds=")]  # <vm>/<method>/ds=<D>
    orphans = {p for p in dirs if p.rpartition("ds=")[2] < cutoff and p not in known}
    gone = {filesystem(r.uri.removeprefix("file:"))[1] for r in doomed}
    keys = [f"{r.vm}/{r.method}/{r.ds}" for r in doomed]
    if keys and not dry_run:  # rows first: from then on no reader resolves them
        collect = render_sql("vm_snapshots_collect", vm_snapshots=table_ref(cfg, VM_SNAPSHOTS))
        spark.sql(collect, args={"keys": keys})
    return _remove(parent, [p for p in dirs if p in gone | orphans], dry_run) | {"collected": keys}


def data_docs(ds, cfg: ExfmConfig, spark=None, *, dry_run: bool = False) -> dict:
    """Delete the GX validation results and Data Docs pages of days older than ``data_docs_days``.

    Validations are stored as ``<suite>/<table>-<ds>/<run time>/`` in the GX project's
    validations store and, rendered, in the Data Docs site; the site index is rebuilt after.
    """
    cutoff = (parse_ds(ds) - dt.timedelta(days=cfg.maintenance.data_docs_days)).isoformat()
    out = {"removed": [], "bytes": 0}
    for root in (f"{cfg.gx_root}/gx/uncommitted/validations", f"{cfg.docs_root}/validations"):
        runs = _dirs(root, depth=2)  # <suite>/<table>-<ds>
        done = _remove(root, [r.path for r in runs if _run_day(r.base_name) < cutoff], dry_run)
        out = {"removed": out["removed"] + done["removed"], "bytes": out["bytes"] + done["bytes"]}
    if out["removed"] and not dry_run:
        from jobs.quality import DOCS_SITE, _context

        _context(cfg).build_data_docs(site_names=[DOCS_SITE])
    return out


STEPS = {  # in the order `run` takes them
    "compact_and_vacuum": compact_and_vacuum,
    "staging": staging,
    "quarantine": quarantine,
    "scratch": scratch,
    "fm_snapshots": fm_snapshots,
    "vm_snapshots": vm_snapshots,
    "data_docs": data_docs,
}


def _run_day(name: str) -> str:
    """The ds of a GX run name ``<table>-<ds>`` (or "9999" when it has none: kept)."""
    day = name[-len("YYYY-MM-DD") :]
    try:
        return dt.date.fromisoformat(day).isoformat()
    except ValueError:
        return "9999"


def _days(spark, cfg: ExfmConfig, table: str) -> set[str]:
    return {r.ds for r in spark.read.format("delta").load(cfg.table(table)).select("ds").distinct().collect()}


def _dirs(uri: str, depth: int = 1) -> list:
    """pyarrow FileInfo of the directories ``depth`` levels under ``uri`` (none if it does not exist)."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    infos = [fs.get_file_info(path)]
    for _ in range(depth):
        infos = [
            child
            for info in infos
            if info.type == pafs.FileType.Directory
            for child in sorted(fs.get_file_info(pafs.FileSelector(info.path)), key=lambda i: i.path)
        ]
    return [i for i in infos if i.type == pafs.FileType.Directory]


def _file_bytes(uris: list[str]) -> int:
    if not uris:
        return 0
    fs, _ = filesystem(uris[0].removeprefix("file:"))
    return sum(i.size or 0 for i in fs.get_file_info([filesystem(u.removeprefix("file:"))[1] for u in uris]))


def _remove(uri: str, paths: list[str], dry_run: bool) -> dict:
    """Delete directories (paths on the filesystem of ``uri``) or, on a dry run, only list them."""
    fs, _ = filesystem(uri)
    sizes = {p: tree_bytes(fs, p) for p in paths}
    for p, size in sizes.items():
        if not dry_run:
            fs.delete_dir(p)
        log.info("%s %s (%d bytes)", "would remove" if dry_run else "removed", p, size)
    return {"removed": sorted(sizes), "bytes": sum(sizes.values())}
