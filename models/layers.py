"""Shared building blocks, grouped by family: embeddings, MLPs, cross networks, gradient scaling.

Shapes: B = batch, F = categorical fields, E = embedding dim, D = input dim of a block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad``) of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- embeddings


class FeatureEmbedding(nn.Module):
    """One table for all categorical fields; field ``f`` owns rows ``[f * buckets, (f + 1) * buckets)``.

    Args:
        n_fields: number of categorical fields F (may be 0: the output is then (B, 0, E)).
        buckets: hashed vocabulary size per field; ids are in ``[0, buckets)``. Id 0 means
            missing/null and is a learned row like any other.
        dim: embedding dim E.
        sparse: the table's gradient is a sparse tensor holding only the rows a batch looked
            up, for a row-wise optimizer (see ``models.optim``); a dense gradient (and dense
            Adam) would touch every row of every table at every step.

    Shapes: ``(B, F)`` LongTensor -> ``(B, F, E)``.

    Example::

        emb = FeatureEmbedding(n_fields=3, buckets=100, dim=8)
        emb(torch.randint(0, 100, (32, 3))).shape  # (32, 3, 8)
    """

    def __init__(self, n_fields: int, buckets: int, dim: int, sparse: bool = True) -> None:
        super().__init__()
        assert n_fields >= 0 and buckets > 0 and dim > 0, f"bad sizes {n_fields=} {buckets=} {dim=}"
        self.n_fields, self.buckets, self.dim, self.sparse = n_fields, buckets, dim, sparse
        # One table (not F tables) so that a lookup is a single gather whatever F is.
        self.weight = nn.Parameter(torch.empty(n_fields * buckets, dim))
        if self.weight.numel():
            nn.init.normal_(self.weight, std=0.01)  # small: pairwise products start near 0
        # Not persistent: derived from the sizes, so it stays out of the state_dict.
        self.register_buffer("offsets", torch.arange(n_fields) * buckets, persistent=False)  # (F,)

    def forward(self, ids: Tensor) -> Tensor:
        assert ids.dim() == 2 and ids.shape[1] == self.n_fields, f"want (B, {self.n_fields}), got {ids.shape}"
        if ids.numel():
            # Without this check an id >= buckets would silently read the next field's rows.
            lo, hi = int(ids.min()), int(ids.max())
            assert lo >= 0 and hi < self.buckets, f"ids in [{lo}, {hi}], not [0, {self.buckets})"
        return F.embedding(ids + self.offsets, self.weight, sparse=self.sparse)  # (B, F, E)


# ----------------------------------------------------------------------------- MLPs


class MLP(nn.Module):
    """``Linear + ReLU (+ Dropout)`` per hidden layer, then an optional plain ``Linear`` to ``out_dim``.

    Args:
        in_dim: input features D.
        dims: hidden layer widths; may be empty.
        out_dim: width of a final Linear without activation, or None for no final layer.
        dropout: dropout after each hidden ReLU (0 disables it).

    Shapes: ``(B, D)`` -> ``(B, out_features)`` where ``out_features`` is ``out_dim``, else
    ``dims[-1]``, else ``in_dim`` (an empty MLP is the identity).

    Example::

        MLP(10, (64, 32), out_dim=1)(torch.randn(4, 10)).shape  # (4, 1)
    """

    def __init__(self, in_dim: int, dims: tuple[int, ...], out_dim: int | None, dropout: float = 0.0) -> None:
        super().__init__()
        assert in_dim > 0 and all(d > 0 for d in dims), f"bad sizes {in_dim=} {dims=}"
        assert 0.0 <= dropout < 1.0, f"dropout must be in [0, 1), got {dropout}"
        layers: list[nn.Module] = []
        width = in_dim
        for d in dims:
            layers += [nn.Linear(width, d), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = d
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, out_features)


def init_prior_(linear: nn.Linear, prior_ctr: float | tuple[float, ...] | None) -> None:
    """Start a logit output at the log-odds of a prior click rate (one per output, or one for all).

    With a default (zero-mean) bias a CTR model starts at p = 0.5 and spends its first
    thousands of steps only learning the base rate; a one-pass day has few steps to spare.
    """
    if prior_ctr is None:
        return
    priors = torch.as_tensor(prior_ctr, dtype=torch.float64).expand(linear.out_features)
    assert ((priors > 0) & (priors < 1)).all(), f"prior_ctr must be in (0, 1), got {prior_ctr}"
    with torch.no_grad():
        linear.bias.copy_(torch.logit(priors))


# ----------------------------------------------------------------------------- cross networks


class CrossNet(nn.Module):
    """DCN cross network (Wang et al. 2017): ``x_{l+1} = x0 * (x_l · w_l) + b_l + x_l``, ``w_l`` a vector.

    Args:
        dim: input width D (kept by every layer).
        layers: number of cross layers.

    Shapes: ``(B, D)`` -> ``(B, D)``.

    Example::

        CrossNet(dim=16, layers=3)(torch.randn(4, 16)).shape  # (4, 16)
    """

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        assert dim > 0 and layers >= 1, f"bad sizes {dim=} {layers=}"
        self.w = nn.ModuleList(nn.Linear(dim, 1, bias=False) for _ in range(layers))
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in range(layers))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0  # (B, D)
        for w, b in zip(self.w, self.b, strict=True):
            x = x0 * w(x) + b + x  # (B, D) * (B, 1): one scalar per row, so O(D) parameters per layer
        return x


class CrossNetV2(nn.Module):
    """DCNv2 cross network (Wang et al. 2021): ``x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l``, ``W_l`` full D×D.

    Args:
        dim: input width D (kept by every layer).
        layers: number of cross layers.

    Shapes: ``(B, D)`` -> ``(B, D)``.

    Example::

        CrossNetV2(dim=16, layers=3)(torch.randn(4, 16)).shape  # (4, 16)
    """

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        assert dim > 0 and layers >= 1, f"bad sizes {dim=} {layers=}"
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0  # (B, D)
        for linear in self.layers:
            x = x0 * linear(x) + x  # (B, D): element-wise, so each output mixes all D inputs of x_l
        return x


# ----------------------------------------------------------------------------- gradient scaling


class GradScale(torch.autograd.Function):
    """Gradient Scaling (GS, paper §3.3): identity forward, gradient multiplied by ``beta`` backward.

    Placed between the backbone output and a distillation head, it leaves the head's own
    gradients unchanged but makes the head's pull on the shared backbone ``beta`` times stronger.

    Shapes: any -> same.
    """

    @staticmethod
    def forward(ctx, x: Tensor, beta: float) -> Tensor:
        ctx.beta = beta
        return x.view_as(x)  # a view, not x itself, so autograd records this node

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.beta, None  # no gradient for beta (a constant)


def grad_scale(x: Tensor, beta: float) -> Tensor:
    """``x`` in the forward pass; its gradient is scaled by ``beta`` in the backward pass (see GradScale)."""
    return GradScale.apply(x, beta)
