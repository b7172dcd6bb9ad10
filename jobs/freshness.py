"""freshness: the staleness alarm, when the teacher of a day is older than `das.max_staleness_days`.

The FM stops updating without anyone noticing when `train_fm` fails, blessing rejects its
snapshot day after day, or the pointer freezes: the DAS keeps scoring with the newest eligible
snapshot, and the VMs keep learning from an ever staler teacher (the paper's Fig 2 shows what
that costs). This step measures the age of the day's teacher and fails loudly past the limit,
with what the staleness costs in NE as measured on this lakehouse (``gain_by_staleness``).

    exfm teacher-freshness --ds 2026-01-05
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict

from jobs import publishing
from jobs.config import DataError, ExfmConfig, parse_ds
from jobs.lakehouse import VM_EVAL, table_version

log = logging.getLogger(__name__)


class StaleTeacherError(DataError):
    """The day's teacher is older than ``das.max_staleness_days``, or none is eligible though FMs trained."""


def run(ds: str | dt.date, cfg: ExfmConfig, spark) -> dict:
    """The age of the teacher of ``ds``; raises ``StaleTeacherError`` past ``das.max_staleness_days``.

    Nothing to check before the first FM (the VMs cold-start) or during the FM's warm-up.
    """
    day = parse_ds(ds)
    limit = cfg.das.max_staleness_days
    trained = [r for r in publishing.list_snapshots(cfg, spark) if r.day < day]
    out = {"ds": day.isoformat(), "max_staleness_days": limit, "teacher": None, "fm_staleness_days": None}
    if not trained or publishing.in_fm_warmup(day, cfg, spark):
        log.info("ds=%s: no FM trained before it (or in warm-up): no teacher to be stale", day)
        return out
    teacher = publishing.teacher_for_day(day, cfg, spark)
    newer = [r for r in trained if teacher is None or r.day > teacher.day]
    age = None if teacher is None else (day - teacher.day).days
    out |= {"teacher": teacher and teacher.snapshot_id, "fm_staleness_days": age}
    if age is not None and age <= limit:
        log.info("ds=%s: teacher %s is %d day(s) old (limit %d)", day, teacher.snapshot_id, age, limit)
        return out
    what = (
        f"its teacher {teacher.snapshot_id} was trained through {teacher.trained_through_ds}, {age} days old"
        if teacher
        else "no FM snapshot is eligible to teach it"
    )
    since = ", ".join(f"{r.snapshot_id} ({r.status})" for r in sorted(newer, key=lambda r: r.day)) or "none"
    missing = (day - dt.timedelta(days=1) - max(r.day for r in trained)).days  # days without an FM at all
    raise StaleTeacherError(
        f"stale FM teacher for ds={day}: {what} (das.max_staleness_days={limit}). "
        f"FM snapshots trained since: {since}"
        + (
            f"; no FM trained on the last {missing} day(s) (train_fm failed or never ran)"
            if missing > 0
            else ""
        )
        + f". {cost_sentence(eval_rows(cfg, spark), age)} "
        + (
            f"das.freeze_days={cfg.das.freeze_days} holds the DAS back on purpose (a staleness study)."
            if cfg.das.freeze_days
            else "Fix train_fm / publish_fm / update_pointer of those days and clear them, "
            "or the VMs keep learning from a stale teacher."
        )
    )


def eval_rows(cfg: ExfmConfig, spark) -> list[dict]:
    """vm_eval as dicts (small: VMs x methods rows a day)."""
    if table_version(cfg, VM_EVAL) is None:
        return []
    cols = ("ds", "vm", "method", "ne", "fm_staleness_days")
    return [r.asDict() for r in spark.read.format("delta").load(cfg.table(VM_EVAL)).select(*cols).collect()]


def gain_by_staleness(evals: list[dict]) -> dict[int, tuple[float, int]]:
    """The FM's value by the age of the teacher: staleness (days) -> (mean NE gain in % of the
    distilled students over the same VM's `none` of the same day, number of (vm, method, day)).

    Measured on this lakehouse's own history (vm_eval), not assumed: the gain curve of the
    paper's Fig 2 as this deployment sees it. The FM's own rows are left out.
    """
    from models.metrics import ne_gain_pct

    base = {(r["ds"], r["vm"]): r["ne"] for r in evals if r["method"] == "none"}
    gains = defaultdict(list)
    for r in evals:
        key = (r["ds"], r["vm"])
        if r["method"] in ("none", "fm", "fm_merged") or key not in base or r["fm_staleness_days"] is None:
            continue
        gains[r["fm_staleness_days"]].append(ne_gain_pct(r["ne"], base[key]))
    return {k: (sum(v) / len(v), len(v)) for k, v in sorted(gains.items())}


def cost_sentence(evals: list[dict], age: int | None) -> str:
    """What the staleness costs, in words, from ``gain_by_staleness``."""
    curve = gain_by_staleness(evals)
    if not curve:
        return (
            "Its cost in NE is not measured on this lakehouse yet (no distilled VM evaluated); "
            "studies/staleness.yaml measures it."
        )
    fresh = min(curve)
    parts = [f"{g:+.2f}% at {k} day(s) (n={n})" for k, (g, n) in curve.items()]
    text = "Measured NE gain of the distilled VMs over `none` by teacher age: " + ", ".join(parts) + "."
    if age is not None and age in curve and age != fresh:
        lost = curve[fresh][0] - curve[age][0]
        text += f" At {age} days the VMs lose {lost:+.2f} points of gain against a {fresh}-day teacher."
    return text
