"""train-vm: one pass of a VM over vm_training[ds, vm] with external distillation from the FM.

Methods (paper §3.3-3.4): ``none`` (labels only), ``kd`` (Eq 2), ``ah`` (Eq 5: Auxiliary
Head with LW w, LS alpha, GS beta), ``ah_sa`` (Algorithm 1: the Student Adapter learns
MLP(teacher) on the label by Eq 6, then the VM trains on Eq 5 + Eq 7 against the adapter's
stop-gradiented output, through a second distillation head).
"""

from __future__ import annotations

import datetime as dt

from jobs import snapshots
from jobs.config import ExfmConfig, parse_ds
from jobs.lakehouse import VM_TRAFFIC, VM_TRAINING
from jobs.train_fm import ID_FEATURES
from jobs.training import Progress, config_args, day_batches, day_ctr, evaluate, previous_snapshot, save_day

TEACHER = "teacher_score"  # FM probability appended by the DAS (DESIGN.md §2)


def build_model(model_config: dict):
    from models.vm import VerticalModel, VMConfig

    return VerticalModel(VMConfig(**config_args(model_config)))


def run(
    ds: str | dt.date, vm_name: str, cfg: ExfmConfig, spark, *, method: str | None = None, fresh: bool = False
) -> dict:
    import torch

    from models.data import FeatureEncoder
    from models.heads import AdapterConfig, StudentAdapter
    from models.losses import METHODS, DistillConfig, adapter_loss, vm_loss

    day = parse_ds(ds)
    vm = cfg.vm(vm_name)
    t = cfg.vm_training
    method = method or t.method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    uri = snapshots.vm_uri(cfg, vm.name, method, day)
    prev_uri = previous_snapshot(uri.rsplit("/", 1)[0], day, fresh)

    torch.manual_seed(cfg.seeds.train)
    if prev_uri is None:
        encoder = FeatureEncoder(
            categorical=(*ID_FEATURES, *vm.categorical),
            dense=vm.dense,
            buckets=t.buckets,
            seed=cfg.seeds.train,
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
            "prior_ctr": day_ctr(spark, cfg, VM_TRAINING, day, vm.label, vm=vm.name),
        }
    else:
        prev = snapshots.load(prev_uri)
        encoder = FeatureEncoder.from_state(prev.meta["encoder"])
        model_config = prev.meta["model_config"]
    model = build_model(model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr)
    adapter = adapter_optimizer = None
    if method == "ah_sa":
        adapter = StudentAdapter(AdapterConfig(hidden=t.adapter_hidden))
        adapter_optimizer = torch.optim.Adam(adapter.parameters(), lr=t.adapter_lr)
    if prev_uri is not None:
        model.load_state_dict(prev.state["model"])
        optimizer.load_state_dict(prev.state["optimizer"])
        if adapter is not None:
            adapter.load_state_dict(prev.state["adapter"])
            adapter_optimizer.load_state_dict(prev.state["adapter_optimizer"])
    distill = DistillConfig(method=method, w=t.w, alpha=t.alpha)

    progress = Progress(f"train-vm {vm.name}/{method} ds={day}")
    clicks = 0.0
    teacher_col = None if method == "none" else TEACHER  # `none` never reads teacher scores
    for batch in day_batches(
        spark,
        cfg,
        VM_TRAINING,
        day,
        encoder,
        label=vm.label,
        batch_size=t.batch_size,
        vm=vm.name,
        teacher=teacher_col,
        update_stats=True,
    ):
        adapter_prob = None
        if adapter is not None:  # Algorithm 1, step 1: update the adapter on the label (Eq 6)
            loss_sa = adapter_loss(adapter(batch.teacher), batch.label)
            adapter_optimizer.zero_grad(set_to_none=True)
            loss_sa.backward()
            adapter_optimizer.step()
            with torch.no_grad():  # step 2: SG(y_SA)
                adapter_prob = torch.sigmoid(adapter(batch.teacher))
        losses = vm_loss(
            model(batch.categorical, batch.dense), batch.label, batch.teacher, distill, adapter_prob
        )
        optimizer.zero_grad(set_to_none=True)  # step 3: Eq 5 (+ Eq 7) updates the VM
        losses["loss"].backward()
        optimizer.step()
        clicks += float(batch.label.sum())
        progress.update(batch.size, losses["loss"].item())
    progress.close()

    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if adapter is not None:
        state |= {"adapter": adapter.state_dict(), "adapter_optimizer": adapter_optimizer.state_dict()}
    return save_day(
        uri,
        state,
        day=day,
        prev_uri=prev_uri,
        model=model,
        model_config=model_config,
        encoder=encoder,
        label=vm.label,
        progress=progress,
        clicks=clicks,
        kind="vm",
        vm=vm.name,
        method=method,
        distill={"w": t.w, "alpha": t.alpha, "beta": t.beta},
    )


def evaluate_on_day(
    snapshot_uri: str,
    eval_ds: str | dt.date,
    vm_name: str,
    cfg: ExfmConfig,
    spark,
    *,
    base_rate: float | None = None,
) -> dict:
    """Metrics of a snapshot (FM or VM) on one VM's traffic of ``eval_ds`` (the next day).

    The FM is scored on the VM's own view of the rows (features the VM lacks are absent), as
    the DAS would score them. NE is normalised by the snapshot's training CTR (paper §4.1.2)
    unless ``base_rate`` is given, e.g. to compare models on one normaliser.
    """
    from jobs import train_fm
    from models.data import FeatureEncoder

    snap = snapshots.load(snapshot_uri)
    build = train_fm.build_model if snap.meta["kind"] == "fm" else build_model
    model = build(snap.meta["model_config"])
    model.load_state_dict(snap.state["model"])
    encoder = FeatureEncoder.from_state(snap.meta["encoder"])
    vm = cfg.vm(vm_name)
    batches = day_batches(
        spark, cfg, VM_TRAFFIC, parse_ds(eval_ds), encoder, label=vm.label, batch_size=4096, vm=vm.name
    )
    return evaluate(model, batches, train_base_rate=base_rate or snap.meta["train_ctr"])
