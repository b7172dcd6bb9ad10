"""Evaluation metrics (paper §4.1.2): NE, AUC, LogLoss, calibration, NE gain.

Two layers, as in torchrec's ``ne.py``: pure functions first (over raw tensors or over summable
statistics), then ``StreamingBinaryMetrics``, a thin stateful wrapper whose states are only sums,
so merging workers or days is addition. Everything is computed in float64 and returned as floats.

Degenerate data never raises; it gives NaN:
- NE is NaN when the base rate is 0 or 1 (its entropy is 0) or when there is no data;
- AUC is NaN when only one class is present;
- calibration is NaN when Σy = 0; logloss, ctr and mean_p are NaN on empty data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOGLOSS_EPS = 1e-7  # predictions are clipped to [eps, 1 - eps] so one confident miss stays finite
STATE_KEYS = ("n", "sum_y", "sum_p", "sum_logloss", "pos_hist", "neg_hist")


def _flat64(p: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    assert p.shape == y.shape, f"p {p.shape} vs y {y.shape}"
    return p.detach().double().flatten(), y.detach().double().flatten()  # (N,), (N,)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den != 0 else math.nan


# ----------------------------------------------------------------------------- pure functions


def entropy(rate: float) -> float:
    """Binary entropy (nats) of a base rate; 0 at rates 0 and 1, NaN for a NaN rate."""
    if math.isnan(rate):
        return math.nan
    assert 0.0 <= rate <= 1.0, f"rate must be in [0, 1], got {rate}"
    if rate in (0.0, 1.0):
        return 0.0
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


def _logloss_sum(p: Tensor, y: Tensor) -> float:
    p, y = _flat64(p, y)
    p = p.clamp(LOGLOSS_EPS, 1 - LOGLOSS_EPS)  # (N,)
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).sum())


def logloss(p: Tensor, y: Tensor) -> float:
    """Mean binary cross-entropy (Eq 1) of probabilities ``p`` (N,) against labels ``y`` (N,)."""
    return _ratio(_logloss_sum(p, y), y.numel())


def ne(p: Tensor, y: Tensor, base_rate: float) -> float:
    """Normalized entropy: logloss / entropy(base_rate), ``base_rate`` = mean label of the TRAINING data."""
    return _ratio(logloss(p, y), entropy(base_rate))


def ne_eval_base(p: Tensor, y: Tensor) -> float:
    """NE normalised by the evaluation data's own mean label (not the paper's definition; for reference)."""
    return ne(p, y, _ratio(float(y.double().sum()), y.numel()))


def auc_from_histograms(pos: Tensor, neg: Tensor) -> float:
    """AUC from positive / negative counts per score bin, bins sorted by ascending score.

    A positive beats every negative in a lower bin and half of those in its own bin (ties count 1/2).
    """
    assert pos.shape == neg.shape and pos.dim() == 1, f"pos {pos.shape} vs neg {neg.shape}"
    pos, neg = pos.double(), neg.double()
    neg_below = neg.cumsum(0) - neg  # (K,) negatives strictly below each bin
    wins = (pos * (neg_below + 0.5 * neg)).sum()
    return _ratio(float(wins), float(pos.sum() * neg.sum()))


def auc(p: Tensor, y: Tensor) -> float:
    """Exact AUC (the rank-sum statistic, ties counted half): one bin per distinct score."""
    p, y = _flat64(p, y)
    _, rank = torch.unique(p, sorted=True, return_inverse=True)  # (N,) dense rank of each score
    pos = torch.bincount(rank, weights=y).double()  # (K,)
    neg = torch.bincount(rank, weights=1 - y, minlength=pos.numel()).double()  # (K,)
    return auc_from_histograms(pos, neg)


def calibration(p: Tensor, y: Tensor) -> float:
    """Σp / Σy: 1 is calibrated, > 1 over-predicts."""
    p, y = _flat64(p, y)
    return _ratio(float(p.sum()), float(y.sum()))


def ne_gain_pct(ne_model: float, ne_baseline: float) -> float:
    """Relative NE improvement in % over a baseline (positive = better, since lower NE is better)."""
    return 100.0 * _ratio(ne_baseline - ne_model, ne_baseline)


# ----------------------------------------------------------------------------- summable statistics


def binary_states(p: Tensor, y: Tensor, *, n_bins: int, logit_range: float) -> dict[str, Tensor]:
    """The summable statistics of one batch: counts, sums and score histograms (float64).

    The histograms bin ``logit(p)`` uniformly over ``[-logit_range, logit_range]``: uniform bins in
    probability would put all of a ~1% CTR model's scores into a handful of bins.
    """
    p, y = _flat64(p, y)
    z = torch.logit(p.clamp(LOGLOSS_EPS, 1 - LOGLOSS_EPS))  # (N,) monotone in p, so AUC is unchanged
    idx = ((z + logit_range) / (2 * logit_range) * n_bins).floor().long().clamp(0, n_bins - 1)  # (N,)
    return {
        "n": torch.tensor(float(y.numel()), dtype=torch.float64),
        "sum_y": y.sum(),
        "sum_p": p.sum(),
        "sum_logloss": torch.tensor(_logloss_sum(p, y), dtype=torch.float64),
        # .double(): bincount of an empty input returns int64 whatever the weights' dtype.
        "pos_hist": torch.bincount(idx, weights=y, minlength=n_bins).double(),  # (n_bins,)
        "neg_hist": torch.bincount(idx, weights=1 - y, minlength=n_bins).double(),  # (n_bins,)
    }


def metrics_from_states(states: dict[str, Tensor], *, train_base_rate: float) -> dict[str, float]:
    """All metrics from summed states; AUC is approximate (within-bin ties count 1/2)."""
    n, sum_y = float(states["n"]), float(states["sum_y"])
    mean_logloss = _ratio(float(states["sum_logloss"]), n)
    ctr = _ratio(sum_y, n)
    return {
        "n": n,
        "ne": _ratio(mean_logloss, entropy(train_base_rate)),
        "ne_eval_base": _ratio(mean_logloss, entropy(ctr)),
        "auc": auc_from_histograms(states["pos_hist"], states["neg_hist"]),
        "logloss": mean_logloss,
        "calibration": _ratio(float(states["sum_p"]), sum_y),
        "ctr": ctr,
        "mean_p": _ratio(float(states["sum_p"]), n),
    }


# ----------------------------------------------------------------------------- stateful wrapper


class StreamingBinaryMetrics:
    """Accumulates ``binary_states`` over batches; memory is fixed (two ``n_bins`` histograms).

    Example::

        m = StreamingBinaryMetrics()
        for p, y in batches:
            m.update(p=p, y=y)
        m.compute(train_base_rate=0.01)["ne"]
    """

    def __init__(self, n_bins: int = 2**14, logit_range: float = 16.0) -> None:
        assert n_bins > 0 and logit_range > 0, f"{n_bins=} {logit_range=}"
        self.n_bins, self.logit_range = n_bins, logit_range
        empty = binary_states(torch.zeros(0), torch.zeros(0), n_bins=n_bins, logit_range=logit_range)
        self.states: dict[str, Tensor] = {k: torch.zeros_like(v) for k, v in empty.items()}

    def update(self, *, p: Tensor, y: Tensor) -> None:
        batch = binary_states(p, y, n_bins=self.n_bins, logit_range=self.logit_range)
        for k in STATE_KEYS:
            self.states[k] += batch[k]

    def merge(self, other: StreamingBinaryMetrics) -> None:
        """Adds ``other``'s states into this one (the "sum" reduce across workers)."""
        assert (other.n_bins, other.logit_range) == (self.n_bins, self.logit_range), "histograms differ"
        for k in STATE_KEYS:
            self.states[k] += other.states[k]

    def compute(self, *, train_base_rate: float) -> dict[str, float]:
        return metrics_from_states(self.states, train_base_rate=train_base_rate)
