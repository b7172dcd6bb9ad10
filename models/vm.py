"""The vertical models (VMs, the students): FM, FmFM or DeepFM backbone + serving and distillation heads.

Paper §3.3: the backbone produces ``x``; the serving head gives ``ŷˢ = φ(x)`` (the only output served)
and the auxiliary head gives ``ŷᴰ = ψ(x)``, trained on the FM's pseudo-labels. Gradient Scaling (GS)
sits between ``x`` and every distillation head, so ``beta`` scales only their pull on the backbone.

Eq 7's "another distillation head" is a third, separate head (``sa_head=True``): the AH keeps
consuming α·ŷᶠ (Eq 5) while the SA head consumes SG(ŷˢᴬ), so neither target overwrites the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.layers import MLP, FeatureEmbedding, grad_scale, init_prior_

VM_ARCHS = ("fm", "fmfm", "deepfm")


@dataclass(frozen=True, kw_only=True)
class VMConfig:
    arch: str = "deepfm"  # one of VM_ARCHS
    n_categorical: int  # categorical fields F of this VM; may be 0
    n_dense: int  # dense features D, projected to one extra embedding "field"; may be 0
    buckets: int = 2**14  # hashed ids per field, 0 = missing
    embed_dim: int = 8
    mlp_dims: tuple[int, ...] = (64,)  # DeepFM's deep tower (unused by fm / fmfm)
    head_dims: tuple[int, ...] = (16,)  # hidden widths of every head
    beta: float = 1.0  # GS: scales the gradient from the distillation heads into the backbone
    sa_head: bool = False  # a second distillation head consuming the Student Adapter target (Eq 7)
    prior_ctr: float | None = None  # initial bias of every head = logit(prior_ctr); None keeps torch's

    def __post_init__(self) -> None:
        assert self.arch in VM_ARCHS, f"arch must be one of {VM_ARCHS}, got {self.arch!r}"
        assert self.n_categorical >= 0 and self.n_dense >= 0, f"{self.n_categorical=} {self.n_dense=}"
        assert self.n_categorical + self.n_dense > 0, "the VM needs at least one feature"
        assert self.arch != "deepfm" or len(self.mlp_dims) > 0, "deepfm needs at least one MLP layer"
        assert self.beta >= 0, f"beta must be >= 0, got {self.beta}"


class VerticalModel(nn.Module):
    """A small CTR model: backbone ``x`` (B, H) -> heads ``{"logit", "aux_logit"[, "sa_logit"]}`` (B,)."""

    def __init__(self, config: VMConfig) -> None:
        super().__init__()
        self.config = config
        F, D, E = config.n_categorical, config.n_dense, config.embed_dim
        self.n_fields = F + (D > 0)  # dense features form one extra field
        # Embeddings v_i and first-order weights w_i of the factorization machine.
        self.embedding = FeatureEmbedding(F, config.buckets, E)
        self.first_order = FeatureEmbedding(F, config.buckets, 1)
        self.dense_embed = nn.Linear(D, E) if D > 0 else None
        self.dense_first_order = nn.Linear(D, 1, bias=False) if D > 0 else None  # heads carry the bias

        width = 1 + E  # first-order term + FM pairwise vector
        if config.arch == "fmfm":
            n, (i, j) = self.n_fields, torch.triu_indices(self.n_fields, self.n_fields, offset=1)  # i < j
            P = len(i)
            self.register_buffer("pair_i", i, persistent=False)  # (P,) left field of each pair
            # (n·E, P·E) 0/1 matrix: (v.flatten(1) @ pair_select)[:, p·E:(p+1)·E] is v_j of pair p,
            # so the right side of every pair is one matmul instead of a gather (and a scatter backward).
            select = torch.zeros(n, P, E, E)
            select[j, torch.arange(P)] = torch.eye(E)
            self.register_buffer(
                "pair_select", select.permute(0, 2, 1, 3).reshape(n * E, P * E), persistent=False
            )
            # Identity init: FmFM starts as a plain FM (v_i · v_j) and learns each field pair's metric.
            self.pair_matrix = nn.Parameter(torch.eye(E).repeat(P, 1, 1))  # (P, E, E)
            width = 1 + P
        self.deep = MLP(self.n_fields * E, config.mlp_dims, out_dim=None) if config.arch == "deepfm" else None
        if self.deep is not None:
            width += self.deep.out_features
        self.out_dim = width  # H

        self.serving_head = MLP(width, config.head_dims, out_dim=1)  # φ
        self.aux_head = MLP(width, config.head_dims, out_dim=1)  # ψ
        self.sa_head = MLP(width, config.head_dims, out_dim=1) if config.sa_head else None
        for head in (self.serving_head, self.aux_head, self.sa_head):
            if head is not None:
                init_prior_(head.net[-1], config.prior_ctr)

    def backbone(self, categorical: Tensor, dense: Tensor) -> Tensor:
        """``categorical`` (B, F), ``dense`` (B, D) -> ``x`` (B, H)."""
        B = categorical.shape[0]
        assert dense.shape == (B, self.config.n_dense), f"dense {tuple(dense.shape)} != (B, D)"
        v = self.embedding(categorical)  # (B, F, E)
        first = self.first_order(categorical).sum(dim=1)  # (B, 1)
        if self.dense_embed is not None:
            v = torch.cat([v, self.dense_embed(dense)[:, None]], dim=1)  # (B, F+1, E)
            first = first + self.dense_first_order(dense)  # (B, 1)

        if self.config.arch == "fmfm":
            # v_i^T M_ij v_j for every field pair i < j, as two (B, n·E) x (n·E, P·E) matmuls (the
            # left one by the block matrix holding M_ij at (field i, pair p)): 2-3x faster than
            # gathers + einsum.
            n, E, P = self.n_fields, self.config.embed_dim, self.pair_matrix.shape[0]
            left = self.pair_matrix.new_zeros(n, P, E, E).index_put(
                (self.pair_i, torch.arange(P, device=v.device)), self.pair_matrix
            )  # (n, P, E, E): left[i_p, p] = M_p
            flat = v.flatten(1)  # (B, n·E)
            vm = flat @ left.permute(0, 2, 1, 3).reshape(n * E, P * E)  # (B, P·E): v_i^T M_ij
            pairs = (vm * (flat @ self.pair_select)).view(B, P, E).sum(-1)  # (B, P)
            return torch.cat([first, pairs], dim=1)  # (B, 1 + P)

        # Rendle's O(nE) identity: Σ_{i<j} v_i ⊙ v_j = ½((Σ v_i)² − Σ v_i²).
        pairwise = 0.5 * (v.sum(dim=1).square() - v.square().sum(dim=1))  # (B, E)
        x = torch.cat([first, pairwise], dim=1)  # (B, 1 + E)
        if self.deep is not None:
            x = torch.cat([x, self.deep(v.flatten(1))], dim=1)  # (B, 1 + E + mlp_dims[-1])
        return x

    def forward(self, categorical: Tensor, dense: Tensor) -> dict[str, Tensor]:
        x = self.backbone(categorical, dense)  # (B, H)
        # GS: the distillation heads see x unchanged but send beta × their gradient into the backbone.
        x_distill = grad_scale(x, self.config.beta)  # (B, H)
        out = {
            "logit": self.serving_head(x).squeeze(-1),  # (B,) ŷˢ, the served prediction
            "aux_logit": self.aux_head(x_distill).squeeze(-1),  # (B,) ŷᴰ, Eq 4 / 5
        }
        if self.sa_head is not None:
            out["sa_logit"] = self.sa_head(x_distill).squeeze(-1)  # (B,) Eq 7
        return out
