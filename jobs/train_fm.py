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


def build_model(model_config: dict):
    from models.fm import FMConfig, FoundationModel

    return FoundationModel(FMConfig(**config_args(model_config)))


def start(cfg: ExfmConfig, prev_uri: str | None, prior_ctr: float | None = None):
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
        "prior_ctr": prior_ctr,
    }
    model_config, encoder, prev = resume(prev_uri, model_config, encoder)
    model = build_model(model_config)
    optimizer = SplitOptimizer(model, OptimConfig(lr=cfg.fm.lr, embedding_lr=cfg.fm.embedding_lr))
    if prev is not None:
        model.load_state_dict(prev.state["model"])
        optimizer.load_state_dict(prev.state["optimizer"])
    return model, optimizer, encoder, model_config


def fit_day(model, optimizer, batches, progress: Progress) -> float:
    """One pass over the batches (one gradient step each); returns the clicks seen."""
    import torch.nn.functional as F

    clicks = 0.0
    for batch in batches:
        loss = F.binary_cross_entropy_with_logits(model(batch.categorical, batch.dense)["logit"], batch.label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        clicks += float(batch.label.sum())
        progress.update(batch.size, loss.item())
    progress.close()
    return clicks


def run(ds: str | dt.date, cfg: ExfmConfig, spark, *, fresh: bool = False, publish: bool = True) -> dict:
    """Train the FM on day ds and publish the snapshot (files first, then its fm_snapshots row)."""
    day = parse_ds(ds)
    if len(cfg.labels) != 1:
        raise ValueError(f"the FM trains on one label; the registry has {cfg.labels}")
    label = cfg.labels[0]
    parent = snapshots.fm_uri(cfg, day).rsplit("/", 1)[0]
    prev_uri = previous_snapshot(parent, day, fresh)
    prior = day_ctr(spark, cfg, FM_DATASET, day, label) if prev_uri is None else None
    if cfg.fm.num_processes > 1:
        saved = train_ranks(day, cfg, spark, prev_uri, prior, label)
        return saved if not publish else saved | {"published": publishing.publish(day, cfg, spark)}
    model, optimizer, encoder, model_config = start(cfg, prev_uri, prior)
    progress = Progress(f"train-fm ds={day}")
    clicks = fit_day(model, optimizer, _batches(spark, cfg, day, encoder, label), progress)
    saved = _save(cfg, day, prev_uri, model, optimizer, model_config, encoder, label, progress, clicks)
    if not publish:
        return saved
    return saved | {"published": publishing.publish(day, cfg, spark)}


def _batches(spark, cfg: ExfmConfig, day: dt.date, encoder, label: str, **kwargs):
    """The FM's pass over fm_dataset[day]: without the blessing holdout, which blessing judges on."""
    return day_batches(
        spark,
        cfg,
        FM_DATASET,
        day,
        encoder,
        label=label,
        batch_size=cfg.fm.batch_size,
        update_stats=True,
        holdout="exclude" if cfg.das.blessing.enabled else None,
        **kwargs,
    )


def _save(cfg, day, prev_uri, model, optimizer, model_config, encoder, label, progress, clicks, **extra):
    return save_day(
        snapshots.fm_uri(cfg, day),
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
        day=day,
        prev_uri=prev_uri,
        model=model,
        model_config=model_config,
        encoder=encoder,
        label=label,
        progress=progress,
        clicks=clicks,
        kind="fm",
        **extra,
    )


def train_ranks(day: dt.date, cfg: ExfmConfig, spark, prev_uri: str | None, prior: float | None, label: str):
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
    return distributor.run(_rank, day, cfg, prev_uri, prior, label, files)


def _rank(
    day: dt.date, cfg: ExfmConfig, prev_uri: str | None, prior: float | None, label: str, files: DayFiles
):
    """One rank of ``train_ranks``: rank 0 returns what ``save_day`` returns, the others None."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        model, optimizer, encoder, model_config = start(cfg, prev_uri, prior)  # same seed: same replicas
        start_stats = encoder.state_dict()
        batches = _batches(None, cfg, day, encoder, label, files=files, shard=(rank, world))
        progress = Progress(f"train-fm ds={day} rank {rank}/{world}")
        clicks = fit_day_ranks(model, optimizer, batches, progress)
        totals = torch.tensor([progress.rows, progress.loss_sum, clicks], dtype=torch.float64)
        dist.all_reduce(totals)
        ends = [None] * world
        dist.all_gather_object(ends, encoder.state_dict())
        if rank != 0:
            return None
        encoder.merge_shards(start_stats, ends)
        progress.rows, progress.loss_sum = int(totals[0]), float(totals[1])
        model_state = (model, optimizer, model_config, encoder)
        return _save(cfg, day, prev_uri, *model_state, label, progress, float(totals[2]), num_processes=world)
    finally:
        dist.destroy_process_group()


def fit_day_ranks(model, optimizer, batches, progress: Progress) -> float:
    """``fit_day`` on one rank: every step all-reduces the gradient of the ranks' rows (see
    ``allreduce_grads``); the ranks step until none has a batch left. Returns this rank's clicks."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from models.optim import allreduce_grads

    clicks, source = 0.0, iter(batches)
    while True:
        batch = next(source, None)
        rows = torch.tensor([0.0 if batch is None else float(batch.size)])
        dist.all_reduce(rows)
        if rows.item() == 0:
            break
        optimizer.zero_grad()
        if batch is not None:
            logit = model(batch.categorical, batch.dense)["logit"]
            loss = F.binary_cross_entropy_with_logits(logit, batch.label, reduction="sum")
            loss.backward()
            clicks += float(batch.label.sum())
            progress.update(batch.size, loss.item() / batch.size)
        allreduce_grads(model, rows.item())
        optimizer.step()
    progress.close()
    return clicks
