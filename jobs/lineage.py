"""lineage: what data made a model.

A VM snapshot → the FM snapshot whose teacher scores it learned from → the FM's chain of days,
each with the table, day and Delta version it read (``trained_on``, recorded at training time).
Reading a table at that version (time travel: ``versionAsOf``) gives exactly the rows the model
trained on, also after the day was re-published.
"""

from __future__ import annotations

import datetime as dt

from jobs import publishing, snapshots
from jobs.config import ExfmConfig, parse_ds


def run(cfg: ExfmConfig, spark, *, vm: str, method: str, ds: str | dt.date) -> dict:
    day = parse_ds(ds)
    cfg.vm(vm)  # a KeyError naming the registry for an unknown VM
    uri = snapshots.vm_uri(cfg, vm, method, day)
    meta = snapshots.read_meta(uri)
    out = {"vm_snapshot": _entry(uri, meta), "teacher": None}
    teacher_id = meta.get("teacher_snapshot_id")
    if teacher_id is None:  # `none`, or a cold start: the labels alone
        return out
    row = next((r for r in publishing.list_snapshots(cfg, spark) if r.snapshot_id == teacher_id), None)
    if row is None:
        raise LookupError(f"{uri} learned from FM snapshot {teacher_id}, which fm_snapshots does not list")
    teacher = {"snapshot_id": teacher_id, "status": row.status, **_entry(row.uri, None)}
    if row.collected_at is not None:  # gc-snapshots deleted its files; its row still says what it was
        out["teacher"] = teacher | {"collected_at": str(row.collected_at)}
        return out
    fm = snapshots.read_meta(row.uri)
    chain, prev = [], fm.get("continued_from")
    while prev and snapshots.exists(prev):  # the FM's earlier days, newest first
        earlier = snapshots.read_meta(prev)
        chain.append(_entry(prev, earlier))
        prev = earlier.get("continued_from")
    out["teacher"] = teacher | _entry(row.uri, fm) | {"continued_from": chain}
    return out


def _entry(uri: str, meta: dict | None) -> dict:
    if meta is None:
        return {"uri": uri}
    keep = ("trained_through_ds", "trained_on", "n_examples", "sha256")
    return {"uri": uri} | {k: meta.get(k) for k in keep}
