"""train-fm: one pass over fm_dataset[ds] in arrival order, continuing from the FM of ds - 1.

Θᶠ(t) = one pass of Θᶠ(t−1) over Dᶠ(t) (paper §2, §3.1). The snapshot holds the weights, the
optimizer state and the encoder's running statistics, so day-by-day training in separate
processes gives the same weights as one long run.
"""

from __future__ import annotations

import datetime as dt

from jobs import publishing, snapshots
from jobs.config import ExfmConfig, parse_ds
from jobs.lakehouse import FM_DATASET, DayFiles, day_files
from jobs.training import Progress, config_args, day_batches, day_ctr, previous_snapshot, resume, save_day

ID_FEATURES = ("user_id", "ad_id")  # contract columns every VM carries, embedded like features


def new_encoder(cfg: ExfmConfig):
    from models.data import FeatureEncoder

    return FeatureEncoder(
        categorical=(*ID_FEATURES, *cfg.fm_categorical_features),
        dense=cfg.fm_dense_features,
        buckets=cfg.fm.buckets,
        seed=cfg.seeds.train,
    )


def head_of(meta: dict, label: str, snapshot: str) -> int:
    """The index of the FM head that predicts ``label`` in a snapshot's ``meta``."""
    labels = meta.get("labels", [meta["label"]])
    if label not in labels:
        raise ValueError(
            f"FM snapshot {snapshot} has no head for label {label!r} (its tasks: {labels}): the VMs of that "
            "label must be among fm.source_vms, and a new task needs a new FM chain (train-fm --fresh)"
        )
    return labels.index(label)


def build_model(model_config: dict):
    from models.fm import FMConfig, FoundationModel

    return FoundationModel(FMConfig(**config_args(model_config)))


def start(cfg: ExfmConfig, prev_uri: str | None, prior_ctr: tuple[float, ...] | None = None):
    """(model, optimizer, encoder, model_config): fresh and seeded, or continued from a snapshot
    with today's learning rates (an architecture change is refused, see ``resume``)."""
    import torch

    from models.optim import OptimConfig, SplitOptimizer

    torch.manual_seed(cfg.seeds.train)
    encoder = new_encoder(cfg)
    model_config = {
        "arch": cfg.fm.arch,
        "n_categorical": len(encoder.categorical),
        "n_dense": encoder.n_dense_inputs,
        "buckets": cfg.fm.buckets,
        "embed_dim": cfg.fm.embed_dim,
        "cross_layers": cfg.fm.cross_layers,
        "mlp_dims": list(cfg.fm.mlp_dims),
        "n_tasks": len(cfg.fm_labels),  # one head per label (task) of the FM's source VMs
        "prior_ctr": None if prior_ctr is None else list(prior_ctr),
    }
    model_config, encoder, prev = resume(prev_uri, model_config, encoder)
    model = build_model(model_config)
    optimizer = SplitOptimizer(model, OptimConfig(lr=cfg.fm.lr, embedding_lr=cfg.fm.embedding_lr))
    if prev is not None:
        model.load_state_dict(prev.state["model"])
        optimizer.load_state_dict(prev.state["optimizer"])
    return model, optimizer, encoder, model_config


def fit_day(model, optimizer, batches, progress: Progress):
    """One pass over the batches (one gradient step each, every task's loss); returns
    ``label_totals`` of the labels seen."""
    import torch

    from models.losses import fm_loss

    totals = torch.zeros(2, model.config.n_tasks, dtype=torch.float64)
    for batch in batches:
        loss = fm_loss(model(batch.categorical, batch.dense)["task_logits"], batch.label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals += label_totals(batch.label)
        progress.update(batch.size, loss.item())
    progress.close()
    return totals


def label_totals(y):
    """(2, T) float64: per task, the positives and the labelled rows of labels ``y`` (B, T) (NaN =
    no label); summed over a pass (and over ranks) they give each task's training rate."""
    import torch

    return torch.stack([torch.nansum(y, dim=0), (~torch.isnan(y)).sum(dim=0)]).double()


def run(ds: str | dt.date, cfg: ExfmConfig, spark, *, fresh: bool = False, publish: bool = True) -> dict:
    """Train the FM on day ds and publish the snapshot (files first, then its fm_snapshots row)."""
    day = parse_ds(ds)
    labels = cfg.fm_labels
    parent = snapshots.fm_uri(cfg, day).rsplit("/", 1)[0]
    prev_uri = previous_snapshot(parent, day, fresh)
    prior = (
        tuple(day_ctr(spark, cfg, FM_DATASET, day, label) for label in labels) if prev_uri is None else None
    )
    if cfg.fm.num_processes > 1:
        saved = train_ranks(day, cfg, spark, prev_uri, prior, labels)
        return saved if not publish else saved | {"published": publishing.publish(day, cfg, spark)}
    model, optimizer, encoder, model_config = start(cfg, prev_uri, prior)
    progress = Progress(f"train-fm ds={day}")
    files = day_files(spark, cfg, FM_DATASET, day)
    totals = fit_day(model, optimizer, _batches(spark, cfg, day, encoder, labels, files=files), progress)
    saved = _save(
        cfg, day, prev_uri, model, optimizer, model_config, encoder, labels, progress, totals, files
    )
    if not publish:
        return saved
    return saved | {"published": publishing.publish(day, cfg, spark)}


def _batches(spark, cfg: ExfmConfig, day: dt.date, encoder, labels: tuple[str, ...], **kwargs):
    """The FM's pass over fm_dataset[day]: without the blessing holdout, which blessing judges on."""
    return day_batches(
        spark,
        cfg,
        FM_DATASET,
        day,
        encoder,
        label=labels,
        batch_size=cfg.fm.batch_size,
        update_stats=True,
        holdout="exclude" if cfg.das.blessing.enabled else None,
        **kwargs,
    )


def _save(
    cfg, day, prev_uri, model, optimizer, model_config, encoder, labels, progress, totals, files, **extra
):
    # Per task, positives / labelled rows (0 for a task the day had no label of).
    rates = {label: float(p / max(n, 1)) for label, p, n in zip(labels, *totals, strict=True)}
    return save_day(
        snapshots.fm_uri(cfg, day),
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
        day=day,
        prev_uri=prev_uri,
        model=model,
        model_config=model_config,
        encoder=encoder,
        label=labels[0],  # the first task: what blessing judges and "logit" predicts
        progress=progress,
        train_ctr=rates[labels[0]],
        kind="fm",
        labels=list(labels),  # the head of task k predicts labels[k]
        train_rates=rates,
        # The rows it learned from: the day of this table version, without the blessing holdout.
        trained_on={"table": FM_DATASET, "ds": day.isoformat(), "version": files.version},
        **extra,
    )


def train_ranks(day: dt.date, cfg: ExfmConfig, spark, prev_uri: str | None, prior, labels: tuple[str, ...]):
    """The day's pass on ``fm.num_processes`` processes (Spark's TorchDistributor, gloo on CPU).

    The day is listed here, once; every rank reads the files with pyarrow (no Spark in a rank)
    and trains on its slice of each batch. The snapshot is written once, by rank 0, after the
    last step; a rank that dies fails the launcher, so no snapshot is written for the day.
    """
    from pyspark.ml.torch.distributor import TorchDistributor

    files = day_files(spark, cfg, FM_DATASET, day)
    if files.direct is None:
        raise ValueError(
            f"fm_dataset ds={day}: its files are not in arrival order, which fm.num_processes > 1 "
            "needs (each rank reads them directly); re-run build-fm-dataset and its gate for the day"
        )
    distributor = TorchDistributor(
        num_processes=cfg.fm.num_processes, local_mode=not cfg.fm.ranks_on_executors, use_gpu=False
    )
    return distributor.run(_rank, day, cfg, prev_uri, prior, labels, files)


def _rank(
    day: dt.date, cfg: ExfmConfig, prev_uri: str | None, prior, labels: tuple[str, ...], files: DayFiles
):
    """One rank of ``train_ranks``: rank 0 returns what ``save_day`` returns, the others None."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        model, optimizer, encoder, model_config = start(cfg, prev_uri, prior)  # same seed: same replicas
        start_stats = encoder.state_dict()
        batches = _batches(None, cfg, day, encoder, labels, files=files, shard=(rank, world))
        progress = Progress(f"train-fm ds={day} rank {rank}/{world}")
        totals = fit_day_ranks(model, optimizer, batches, progress)
        sums = torch.tensor([progress.rows, progress.loss_sum], dtype=torch.float64)
        dist.all_reduce(sums)
        dist.all_reduce(totals)
        ends = [None] * world
        dist.all_gather_object(ends, encoder.state_dict())
        if rank != 0:
            return None
        encoder.merge_shards(start_stats, ends)
        progress.rows, progress.loss_sum = int(sums[0]), float(sums[1])
        model_state = (model, optimizer, model_config, encoder)
        return _save(cfg, day, prev_uri, *model_state, labels, progress, totals, files, num_processes=world)
    finally:
        dist.destroy_process_group()


def fit_day_ranks(model, optimizer, batches, progress: Progress):
    """``fit_day`` on one rank: every step all-reduces the gradient of the ranks' rows (see
    ``allreduce_grads``); the ranks step until none has a batch left. Returns this rank's ``label_totals``."""
    import torch
    import torch.distributed as dist

    from models.losses import fm_loss
    from models.optim import allreduce_grads

    totals, source = torch.zeros(2, model.config.n_tasks, dtype=torch.float64), iter(batches)
    while True:
        batch = next(source, None)
        rows = torch.tensor([0.0 if batch is None else float(batch.size)])
        dist.all_reduce(rows)
        if rows.item() == 0:
            break
        optimizer.zero_grad()
        if batch is not None:
            loss = fm_loss(model(batch.categorical, batch.dense)["task_logits"], batch.label, reduction="sum")
            loss.backward()
            totals += label_totals(batch.label)
            progress.update(batch.size, loss.item() / batch.size)
        allreduce_grads(model, rows.item())
        optimizer.step()
    progress.close()
    return totals
