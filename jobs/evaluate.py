"""evaluate: yesterday's models on today's traffic (paper §4.1.2) -> Delta ``vm_eval``.

For day t, every VM snapshot (vm, method) trained through t-1 is scored on that VM's rows of
day t. Two rows judge the FM:

- ``fm``, the teacher as the VMs saw it: ``vm_training[t].teacher_score`` (the scores the DAS
  appended for training on day t, by the blessed snapshot the pointer held) against day t's
  labels, on each VM's rows;
- ``fm_merged`` (vm ``all``), the FM's own next-day quality: the FM trained through t-1 on
  ``fm_dataset[t]``, the merged view it trains on, normalised by its own training CTR.

Each row holds n, NE, AUC, LogLoss, calibration, the FM staleness of the teacher the model
learned from and, on synthetic data, the oracle NE of the generator's true probabilities. All
NEs of a VM share one normaliser, the VM's click rate on the training day t-1 (the paper's
"mean label of the training data"), so methods, the teacher and the oracle compare directly.
Each VM's day is read once (``vm_training`` when the DAS scored it, else ``vm_traffic``). The
day's rows are staged; the vm_eval gate publishes them.
"""

from __future__ import annotations

import datetime as dt
import logging

from jobs import publishing, quality
from jobs.config import ExfmConfig, VmSpec, parse_ds
from jobs.lakehouse import (
    FM_DATASET,
    VM_EVAL,
    VM_SNAPSHOTS,
    VM_TRAFFIC,
    VM_TRAINING,
    DayFiles,
    arrow_day,
    day_files,
    day_values,
    filesystem,
    quote,
    render_sql,
    table_version,
)
from jobs.training import day_ctr

log = logging.getLogger(__name__)
FM_METHOD = "fm"  # the teacher's scores as the VMs learned from them, per VM
FM_MERGED = "fm_merged"  # the FM's own next-day quality on the FM dataset
ALL_VMS = "all"  # the vm of the fm_merged row: every VM's requests, merged
TEACHER_SCORE = "teacher_score"

SCHEMA = (
    "ds string, vm string, method string, model_ds string, snapshot_uri string, n long, ne double, "
    "ne_eval_base double, auc double, logloss double, calibration double, ctr double, "
    "fm_staleness_days int, teacher_snapshot_id string, oracle_ne double"
)


def run(ds: str | dt.date, cfg: ExfmConfig, spark) -> dict:
    from pyspark.sql import functions as F

    from models.metrics import entropy

    day = parse_ds(ds)
    model_day = day - dt.timedelta(days=1)
    vm_snaps, started = {}, set()
    if table_version(cfg, VM_SNAPSHOTS) is not None:  # small: one row per trained day
        table = spark.read.format("delta").load(cfg.table(VM_SNAPSHOTS))
        for r in table.where(F.col("ds") <= model_day.isoformat()).collect():
            started.add((r.vm, r.method))
            if r.ds == model_day.isoformat():
                vm_snaps[(r.vm, r.method)] = r
    fm = next((r for r in publishing.list_snapshots(cfg, spark) if r.day == model_day), None)

    # Every model to judge, before any work: a hole in a chain fails fast.
    models, not_started = {}, []  # vm -> [(method, uri, teacher_snapshot_id, teacher_trained_through_ds)]
    for vm in cfg.vms:
        for method in vm.methods:
            snap = vm_snaps.get((vm.name, method))
            if snap is None and (vm.name, method) in started:
                # Evaluating without it would quietly drop a method from the comparison.
                raise ValueError(
                    f"vm_snapshots has no {vm.name}/{method} snapshot trained through {model_day}, "
                    f"but earlier ones: run `exfm train-vm --ds {model_day} --vm {vm.name} --method {method}`"
                )
            if snap is None:
                not_started.append(f"{vm.name}/{method}")
                continue
            entry = (method, snap.uri, snap.teacher_snapshot_id, snap.teacher_trained_through_ds)
            models.setdefault(vm.name, []).append(entry)
    snapshot_rows = {r.snapshot_id: r for r in publishing.list_snapshots(cfg, spark)}
    rows = []

    def add(vm: str, method: str, model_ds: str, uri: str, m: dict, teacher_id, teacher_ds, oracle_ne):
        staleness = None if teacher_ds is None else (model_day - dt.date.fromisoformat(teacher_ds)).days
        metrics = {k: float(m[k]) for k in ("ne", "ne_eval_base", "auc", "logloss", "calibration", "ctr")}
        rows.append(
            {
                "ds": day.isoformat(),
                "vm": vm,
                "method": method,
                "model_ds": model_day.isoformat() if model_ds is None else model_ds,
                "snapshot_uri": uri,
                "n": int(m["n"]),
                **metrics,
                "fm_staleness_days": staleness,
                "teacher_snapshot_id": teacher_id,
                "oracle_ne": oracle_ne,
            }
        )
        log.info("vm_eval ds=%s %s/%s: NE %.4f AUC %.4f", day, vm, method, m["ne"], m["auc"])

    for vm in cfg.vms:
        # The teacher scores the DAS appended for day t (one snapshot per VM and day, its gate says).
        listing = day_files(spark, cfg, VM_TRAINING, day, vm=vm.name)
        teacher_ids = day_values(
            spark, cfg, VM_TRAINING, day, "teacher_snapshot_id", vm=vm.name, files=listing
        )
        teacher = snapshot_rows.get(next(iter(teacher_ids))) if len(teacher_ids) == 1 else None
        if vm.name not in models and teacher is None:
            continue
        entries = models.get(vm.name, [])
        base_rate = day_ctr(spark, cfg, VM_TRAFFIC, model_day, vm.label, vm=vm.name)
        oracle = oracle_logloss(day, vm, cfg, spark)
        oracle_ne = None if oracle is None else oracle / entropy(base_rate)
        scored = score_snapshots(
            [entry[1] for entry in entries],
            day,
            vm.name,
            cfg,
            spark,
            base_rate=base_rate,
            **({"table": VM_TRAINING, "scores": [TEACHER_SCORE], "files": listing} if teacher else {}),
        )
        for (method, uri, teacher_id, teacher_ds), m in zip(entries, scored, strict=False):
            add(vm.name, method, None, uri, m, teacher_id, teacher_ds, oracle_ne)
        if teacher is not None:  # the last metrics: the teacher_score column
            through = teacher.trained_through_ds
            add(vm.name, FM_METHOD, through, teacher.uri, scored[-1], teacher.snapshot_id, through, oracle_ne)

    if fm is not None and fm.collected_at is None:  # the FM trained through t-1, on its own data
        (m,) = score_snapshots([fm.uri], day, None, cfg, spark)
        add(ALL_VMS, FM_MERGED, None, fm.uri, m, fm.snapshot_id, fm.trained_through_ds, None)

    if rows or table_version(cfg, quality.staging_table(VM_EVAL)) is not None:
        # Staged for the vm_eval gate, which publishes it; a re-run replaces the day, also to empty.
        quality.stage(spark.createDataFrame(rows, SCHEMA), cfg, VM_EVAL, day)
    return {
        "ds": day.isoformat(),
        "rows": len(rows),
        "evaluated": sorted(f"{r['vm']}/{r['method']}" for r in rows),
        "not_started": not_started,
    }


EVAL_BATCH_ROWS = 16_384


def score_snapshots(
    snapshot_uris: list[str],
    eval_ds: str | dt.date,
    vm_name: str | None,
    cfg: ExfmConfig,
    spark,
    *,
    base_rate: float | None = None,
    table: str = VM_TRAFFIC,
    scores: list[str] = (),
    files: DayFiles | None = None,
) -> list[dict]:
    """Metrics of each snapshot (FM or VM) on one VM's rows of ``eval_ds``, in one read of the day.

    Every model scores every batch of the one pass. The metrics are float sums, and a model's
    scores may differ in the last bits with a row's place in its batch: the rows are read in
    arrival order and cut into batches of a fixed size across files, so the result depends on the
    day's rows only, not on how a writer split them into files (a re-run's split may differ: its
    range bounds come from a sample). The FM is scored on the VM's own view of the rows (features
    the VM lacks are absent).
    ``vm_name=None`` scores the FM dataset instead (the merged view the FM trains on). ``scores``:
    probability columns of ``table`` judged as they are (e.g. the DAS's ``teacher_score``), after
    the snapshots in the result. NE is normalised by each snapshot's training CTR (paper §4.1.2)
    unless ``base_rate`` is given, e.g. to compare models on one normaliser; ``base_rate`` is
    needed for ``scores``.
    """
    import numpy as np
    import pyarrow.compute as pc
    import torch

    from jobs import snapshots, train_fm, train_vm
    from models.data import FeatureEncoder, rebatch
    from models.metrics import StreamingBinaryMetrics

    day = parse_ds(eval_ds)
    table, label = (table, cfg.vm(vm_name).label) if vm_name else (FM_DATASET, cfg.fm_labels[0])
    judged = []  # (model, encoder, meta, the output that predicts label)
    for uri in snapshot_uris:
        snap = snapshots.load(uri)
        fm = snap.meta["kind"] == "fm"
        model = (train_fm if fm else train_vm).build_model(snap.meta["model_config"])
        model.load_state_dict(snap.state["model"])
        head = train_fm.head_of(snap.meta, label, uri) if fm else None  # the FM's head of this task
        judged.append((model.eval(), FeatureEncoder.from_state(snap.meta["encoder"]), snap.meta, head))
    columns = [*dict.fromkeys(c for _, enc, _, _ in judged for c in enc.columns), label, *scores]
    metrics = [StreamingBinaryMetrics() for _ in [*judged, *scores]]
    categorical = tuple(c for _, enc, _, _ in judged for c in enc.categorical)
    day_rows = arrow_day(
        spark,
        cfg,
        table,
        day,
        columns,
        vm=vm_name,
        batch_rows=EVAL_BATCH_ROWS,
        files=files,
        dictionary=categorical,
    )
    with day_rows as (rows, batches), torch.no_grad():
        if not rows:
            raise ValueError(f"{table} has no rows for ds={day}" + (f", vm={vm_name}" if vm_name else ""))
        for batch in rebatch(batches, EVAL_BATCH_ROWS):
            # Requests without this label (the FM dataset's rows of other tasks' VMs) are not judged.
            batch = batch.filter(pc.is_valid(batch.column(label)))
            y = torch.from_numpy(batch.column(label).to_numpy().astype(np.float32))
            for (model, encoder, _, head), m in zip(judged, metrics, strict=False):
                cat, dense = encoder.encode(batch, update_stats=False)
                out = model(cat, dense)
                m.update(p=torch.sigmoid(out["logit"] if head is None else out["task_logits"][:, head]), y=y)
            for column, m in zip(scores, metrics[len(judged) :], strict=True):
                m.update(p=torch.from_numpy(batch.column(column).to_numpy().astype(np.float32)), y=y)
    bases = [base_rate or _train_rate(meta, label) for _, _, meta, _ in judged] + [base_rate] * len(scores)
    return [m.compute(train_base_rate=b) for m, b in zip(metrics, bases, strict=True)]


def _train_rate(meta: dict, label: str) -> float:
    """A snapshot's training rate of ``label`` (an FM has one per task): its NE normaliser."""
    return meta.get("train_rates", {}).get(label, meta["train_ctr"])


def oracle_logloss(day: dt.date, vm: VmSpec, cfg: ExfmConfig, spark) -> float | None:
    """Mean LogLoss of the generator's true probabilities on the VM's rows; None without truth."""
    from pyarrow import fs as pafs

    from jobs.generate import TASKS
    from models.metrics import LOGLOSS_EPS

    path = f"{cfg.truth}/ds={day.isoformat()}"
    storage, local = filesystem(path)
    if storage.get_file_info(local).type == pafs.FileType.NotFound:  # not synthetic data: no oracle
        return None
    truth = spark.read.parquet(path)
    row = spark.sql(
        render_sql("oracle_logloss", label=quote(vm.label), truth=quote(f"p_{TASKS[vm.task][0]}")),
        args={"ds": day.isoformat(), "vm": vm.name, "eps": LOGLOSS_EPS},
        traffic=spark.read.format("delta").load(cfg.table(VM_TRAFFIC)),
        truth=truth,
    ).first()
    return None if not row["n"] else float(row["logloss"])
