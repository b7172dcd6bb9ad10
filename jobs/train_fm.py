"""train-fm: one pass over fm_dataset[ds] in arrival order, continuing from the FM of ds - 1.

Θᶠ(t) = one pass of Θᶠ(t−1) over Dᶠ(t) (paper §2, §3.1). The snapshot holds the weights, the
optimizer state and the encoder's running statistics, so day-by-day training in separate
processes gives the same weights as one long run.
"""

from __future__ import annotations

import datetime as dt

from jobs import publishing, snapshots
from jobs.config import ExfmConfig, parse_ds
from jobs.lakehouse import FM_DATASET
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
    model, optimizer, encoder, model_config = start(cfg, prev_uri, prior)
    batches = day_batches(
        spark,
        cfg,
        FM_DATASET,
        day,
        encoder,
        label=label,
        batch_size=cfg.fm.batch_size,
        update_stats=True,
        holdout="exclude" if cfg.das.blessing.enabled else None,  # blessing judges on the rest
    )
    progress = Progress(f"train-fm ds={day}")
    clicks = fit_day(model, optimizer, batches, progress)

    saved = save_day(
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
    )
    if not publish:
        return saved
    return saved | {"published": publishing.publish(day, cfg, spark)}
