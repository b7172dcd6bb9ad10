"""train-vm: one pass of a VM over vm_training[ds, vm] with external distillation from the FM.

Methods (paper §3.3-3.4): ``none`` (labels only), ``kd`` (Eq 2), ``ah`` (Eq 5: Auxiliary
Head with LW w, LS alpha, GS beta), ``ah_sa`` (Algorithm 1: the Student Adapter learns
MLP(teacher) on the label by Eq 6, then the VM trains on Eq 5 + Eq 7 against the adapter's
stop-gradiented output, through a second distillation head).
"""

from __future__ import annotations

import datetime as dt
import json

from jobs import faults, publishing, snapshots
from jobs.config import ExfmConfig, parse_ds
from jobs.lakehouse import (
    VM_SNAPSHOTS,
    VM_TRAFFIC,
    VM_TRAINING,
    DayFiles,
    day_files,
    day_values,
    render_sql,
    retry_on_conflict,
    table_ref,
)
from jobs.train_fm import ID_FEATURES
from jobs.training import Progress, config_args, day_batches, day_ctr, previous_snapshot, resume, save_day

TEACHER = "teacher_score"  # FM probability appended by the DAS (DESIGN.md §2)


def build_model(model_config: dict):
    from models.vm import VerticalModel, VMConfig

    return VerticalModel(VMConfig(**config_args(model_config)))


def start(cfg: ExfmConfig, vm, method: str, prev_uri: str | None, prior_ctr: float | None):
    """(model, optimizer, adapter, adapter_optimizer, encoder, model_config) of a day: fresh and
    seeded, or continued from a snapshot with today's lr and beta (see ``resume``)."""
    import torch

    from models.data import FeatureEncoder
    from models.heads import AdapterConfig, StudentAdapter
    from models.optim import OptimConfig, SplitOptimizer

    t = cfg.vm_training
    torch.manual_seed(cfg.seeds.train)
    encoder = FeatureEncoder(
        categorical=(*ID_FEATURES, *vm.categorical), dense=vm.dense, buckets=t.buckets, seed=cfg.seeds.train
    )
    model_config = {
        "arch": vm.model,
        "n_categorical": len(encoder.categorical),
        "n_dense": encoder.n_dense_inputs,
        "buckets": t.buckets,
        "embed_dim": t.embed_dim,
        "mlp_dims": list(t.mlp_dims),
        "head_dims": list(t.head_dims),
        "beta": t.beta,
        "sa_head": method == "ah_sa",
        "prior_ctr": prior_ctr,
    }
    # GS's beta may change from one day to the next; w and alpha are read from t below.
    model_config, encoder, prev = resume(prev_uri, model_config, encoder, mutable=("beta",))
    model = build_model(model_config)
    optimizer = SplitOptimizer(model, OptimConfig(lr=t.lr, embedding_lr=t.embedding_lr))
    adapter = adapter_optimizer = None
    if method == "ah_sa":
        adapter = StudentAdapter(AdapterConfig(hidden=t.adapter_hidden))
        adapter_optimizer = SplitOptimizer(adapter, OptimConfig(lr=t.adapter_lr, embedding_lr=t.embedding_lr))
    if prev is not None:
        model.load_state_dict(prev.state["model"])
        optimizer.load_state_dict(prev.state["optimizer"])
        if adapter is not None:
            adapter.load_state_dict(prev.state["adapter"])
            adapter_optimizer.load_state_dict(prev.state["adapter_optimizer"])
    return model, optimizer, adapter, adapter_optimizer, encoder, model_config


def fit_day(
    model, optimizer, distill, batches, progress: Progress, adapter=None, adapter_optimizer=None
) -> float:
    """One pass of a VM over the batches by Algorithm 1 (one step each); returns the clicks seen.

    The Student Adapter steps first on the label (Eq 6) when there is one and the day has teacher
    scores; the VM then steps on its method's loss against the adapter's stop-gradiented output.
    """
    import torch

    from models.losses import adapter_loss, vm_loss

    clicks = 0.0
    use_adapter = adapter is not None and distill.method != "none"
    for batch in batches:
        adapter_prob = None
        if use_adapter:  # Algorithm 1 step 1: the adapter on the label (Eq 6)
            loss_sa = adapter_loss(adapter(batch.teacher), batch.label)
            adapter_optimizer.zero_grad()
            loss_sa.backward()
            adapter_optimizer.step()
            with torch.no_grad():  # step 2: SG(y_SA)
                adapter_prob = torch.sigmoid(adapter(batch.teacher))
        losses = vm_loss(
            model(batch.categorical, batch.dense), batch.label, batch.teacher, distill, adapter_prob
        )
        optimizer.zero_grad()  # step 3: Eq 5 (+ Eq 7) updates the VM
        losses["loss"].backward()
        optimizer.step()
        clicks += float(batch.label.sum())
        progress.update(batch.size, losses["loss"].item())
    progress.close()
    return clicks


def run(
    ds: str | dt.date, vm_name: str, cfg: ExfmConfig, spark, *, method: str | None = None, fresh: bool = False
) -> dict:
    from models.losses import METHODS, DistillConfig

    day = parse_ds(ds)
    vm = cfg.vm(vm_name)
    t = cfg.vm_training
    method = method or t.method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if publishing.in_fm_warmup(day, cfg, spark):
        raise ValueError(
            f"ds={day} is in the FM's warm-up (fm.warmup_days={cfg.fm.warmup_days}): "
            "the VMs start once the FM has trained that many days"
        )
    uri = snapshots.vm_uri(cfg, vm.name, method, day)
    prev_uri = previous_snapshot(uri.rsplit("/", 1)[0], day, fresh)
    listing = day_files(spark, cfg, VM_TRAINING, day, vm=vm.name)  # once: teacher lineage and the read
    teacher = day_teacher(day, vm.name, cfg, spark, listing)
    cold_start = teacher is None
    table = VM_TRAFFIC if cold_start else VM_TRAINING
    if cold_start:
        listing = day_files(spark, cfg, VM_TRAFFIC, day, vm=vm.name)

    prior = None if prev_uri else day_ctr(spark, cfg, table, day, vm.label, vm=vm.name)
    model, optimizer, adapter, adapter_optimizer, encoder, model_config = start(
        cfg, vm, method, prev_uri, prior
    )
    # Cold start (no FM yet): the labels alone, whatever the method; its heads start learning
    # from the teacher on the first day that has teacher scores.
    distill = DistillConfig(method="none" if cold_start else method, w=t.w, alpha=t.alpha)
    progress = Progress(f"train-vm {vm.name}/{method} ds={day}" + (" (cold start)" if cold_start else ""))
    teacher_col = None if distill.method == "none" else TEACHER  # `none` never reads teacher scores
    batches = day_batches(
        spark,
        cfg,
        table,
        day,
        encoder,
        label=vm.label,
        batch_size=t.batch_size,
        vm=vm.name,
        teacher=teacher_col,
        update_stats=True,
        files=listing,
    )
    clicks = fit_day(model, optimizer, distill, batches, progress, adapter, adapter_optimizer)

    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if adapter is not None:
        state |= {"adapter": adapter.state_dict(), "adapter_optimizer": adapter_optimizer.state_dict()}
    # The teacher the snapshot learned from (`none` never read a teacher score).
    lineage = dict.fromkeys(("teacher_snapshot_id", "teacher_trained_through_ds"))
    if teacher is not None and method != "none":
        lineage = teacher
    hyper = {
        "w": t.w,
        "alpha": t.alpha,
        "beta": model_config["beta"],
        "lr": t.lr,
        "embedding_lr": t.embedding_lr,
        "adapter_lr": t.adapter_lr,
        "batch_size": t.batch_size,
    }
    saved = save_day(
        uri,
        state,
        day=day,
        prev_uri=prev_uri,
        model=model,
        model_config=model_config,
        encoder=encoder,
        label=vm.label,
        progress=progress,
        train_ctr=clicks / max(progress.rows, 1),
        kind="vm",
        vm=vm.name,
        method=method,
        distill=hyper,
        cold_start=cold_start,
        # The rows it learned from: that day and VM of this table version (time travel reads them).
        trained_on={"table": table, "ds": day.isoformat(), "vm": vm.name, "version": listing.version},
        **lineage,
    )
    ref = table_ref(cfg, VM_SNAPSHOTS)
    args = {
        "vm": vm.name,
        "method": method,
        "ds": day.isoformat(),
        "uri": uri,
        "sha256": saved["sha256"],
        **lineage,
        "n_examples": saved["n_examples"],
        "train_loss": saved["train_loss"],
        "hyper_parameters": json.dumps(hyper, sort_keys=True),
    }

    def register():  # the other (vm, method) tasks of the day register at the same time
        spark.sql(render_sql("vm_snapshots_create", vm_snapshots=ref))
        spark.sql(render_sql("vm_snapshots_upsert", vm_snapshots=ref), args=args)

    with faults.delta_write(VM_SNAPSHOTS, cfg.table(VM_SNAPSHOTS)):
        retry_on_conflict(register, what=f"vm_snapshots {vm.name}/{method} ds={day}")
    return saved | {"cold_start": cold_start, **lineage}


def day_teacher(day: dt.date, vm: str, cfg: ExfmConfig, spark, listing: DayFiles) -> dict | None:
    """The FM snapshot whose scores vm_training[ds, vm] holds (id, trained_through_ds), or None
    on a cold start. ``listing``: the day's files of vm_training (``day_files``).

    A cold start is only a day no eligible FM snapshot can score (before the first FM, or
    after only rejected ones): a missing DAS run on a day with a teacher is an error, never a
    silent switch to training without the teacher.
    """
    ids = day_values(spark, cfg, VM_TRAINING, day, "teacher_snapshot_id", vm=vm, files=listing)
    if len(ids) > 1:
        raise ValueError(
            f"vm_training ds={day} vm={vm} mixes teacher snapshots {sorted(map(str, ids))}: re-run das-score"
        )
    if ids:
        (snapshot_id,) = ids
        row = next((r for r in publishing.list_snapshots(cfg, spark) if r.snapshot_id == snapshot_id), None)
        through = row.trained_through_ds if row else None  # None: vm_training copied from elsewhere
        return {"teacher_snapshot_id": snapshot_id, "teacher_trained_through_ds": through}
    if publishing.teacher_for_day(day, cfg, spark) is not None:
        raise ValueError(
            f"vm_training has no rows for ds={day}, vm={vm}: run `exfm das-score --ds {day}` first"
        )
    return None
