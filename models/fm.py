"""The foundation model (FM, the teacher): DCNv2 by default, DCN as an option (paper §4.1.3).

Several tasks (paper Table 5) share everything but the output layer (hard parameter sharing):
one logit per task, e.g. click, like and follow on the same requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.layers import MLP, CrossNet, CrossNetV2, FeatureEmbedding, init_prior_

FM_ARCHS = ("dcnv2", "dcn")


@dataclass(frozen=True, kw_only=True)
class FMConfig:
    arch: str = "dcnv2"  # one of FM_ARCHS: which cross network runs beside the deep MLP
    n_categorical: int  # categorical fields F (the union of all VMs' features); may be 0
    n_dense: int  # dense features D, expected already standardised upstream; may be 0
    buckets: int = 2**14  # hashed ids per field, 0 = missing
    embed_dim: int = 16
    cross_layers: int = 3
    mlp_dims: tuple[int, ...] = (256, 128)
    dropout: float = 0.0  # in the deep MLP only
    n_tasks: int = 1  # output logits, one per task (label)
    # initial output bias = logit(prior), one prior per task (or one for all); None keeps torch's init
    prior_ctr: float | tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        assert self.arch in FM_ARCHS, f"arch must be one of {FM_ARCHS}, got {self.arch!r}"
        assert self.n_categorical >= 0 and self.n_dense >= 0, f"{self.n_categorical=} {self.n_dense=}"
        assert self.n_categorical + self.n_dense > 0, "the FM needs at least one feature"
        assert len(self.mlp_dims) > 0, "the deep tower needs at least one layer"
        assert self.n_tasks >= 1, f"n_tasks must be >= 1, got {self.n_tasks}"
        priors = self.prior_ctr if isinstance(self.prior_ctr, tuple) else None
        assert priors is None or len(priors) == self.n_tasks, f"{self.n_tasks} tasks, priors {priors}"


class FoundationModel(nn.Module):
    """Parallel DCN / DCNv2: ``logits = Linear([cross(x0), MLP(x0)])`` with ``x0 = [embeddings, dense]``."""

    def __init__(self, config: FMConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = FeatureEmbedding(config.n_categorical, config.buckets, config.embed_dim)
        in_dim = config.n_categorical * config.embed_dim + config.n_dense
        cross_cls = CrossNetV2 if config.arch == "dcnv2" else CrossNet
        self.cross = cross_cls(in_dim, config.cross_layers)
        self.deep = MLP(in_dim, config.mlp_dims, out_dim=None, dropout=config.dropout)
        self.out = nn.Linear(in_dim + self.deep.out_features, config.n_tasks)  # one row per task
        init_prior_(self.out, config.prior_ctr)

    def forward(self, categorical: Tensor, dense: Tensor) -> dict[str, Tensor]:
        """``categorical`` (B, F) bucket ids, ``dense`` (B, D) floats -> ``{"task_logits": (B, T),
        "logit": (B,)}``, ``logit`` being the first task's."""
        B = categorical.shape[0]
        assert dense.shape == (B, self.config.n_dense), f"dense {tuple(dense.shape)} != (B, D)"
        emb = self.embedding(categorical)  # (B, F, E)
        x0 = torch.cat([emb.flatten(1), dense], dim=1)  # (B, F*E + D)
        h = torch.cat([self.cross(x0), self.deep(x0)], dim=1)  # (B, F*E + D + mlp_dims[-1])
        logits = self.out(h)  # (B, T)
        return {"task_logits": logits, "logit": logits[:, 0]}
