"""Metrics against sklearn / numpy references, degenerate data, streaming vs one-shot, merge."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from models.metrics import (
    StreamingBinaryMetrics,
    auc,
    calibration,
    entropy,
    logloss,
    ne,
    ne_eval_base,
    ne_gain_pct,
)


def data(n: int = 20_000, seed: int = 0, ctr: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    p = torch.sigmoid(torch.randn(n, generator=g) + math.log(ctr / (1 - ctr)))  # (n,) skewed low like CTRs
    y = torch.bernoulli(p, generator=g)  # labels drawn from p: p is calibrated
    return p, y


def test_ne_of_constant_base_rate_predictor_is_one():
    _, y = data()
    base = float(y.mean())
    assert ne(torch.full_like(y, base), y, base) == pytest.approx(1.0, abs=1e-6)
    assert ne_eval_base(torch.full_like(y, base), y) == pytest.approx(1.0, abs=1e-6)


def test_ne_uses_the_given_base_rate():
    p, y = data()
    assert ne(p, y, 0.2) == pytest.approx(logloss(p, y) / entropy(0.2), rel=1e-12)
    h = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    assert entropy(0.2) == pytest.approx(h, rel=1e-12)


def test_logloss_matches_sklearn():
    p, y = data()
    assert logloss(p, y) == pytest.approx(log_loss(y.numpy(), p.double().numpy()), rel=1e-9)


def test_auc_matches_sklearn_with_ties():
    g = torch.Generator().manual_seed(1)
    p = torch.round(torch.rand(5_000, generator=g) * 50) / 50  # many ties
    y = (torch.rand(5_000, generator=g) < 0.2 + 0.5 * p).float()
    assert auc(p, y) == pytest.approx(roc_auc_score(y.numpy(), p.numpy()), abs=1e-9)
    p, y = data()
    assert auc(p, y) == pytest.approx(roc_auc_score(y.numpy(), p.numpy()), abs=1e-9)


def test_calibration_of_true_probabilities():
    p, y = data(n=200_000)
    assert calibration(p, y) == pytest.approx(1.0, abs=0.05)
    assert calibration(2 * p, y) == pytest.approx(2 * calibration(p, y), rel=1e-9)


def test_ne_gain_pct():
    assert ne_gain_pct(0.98, 1.0) == pytest.approx(2.0)
    assert ne_gain_pct(1.01, 1.0) == pytest.approx(-1.0)


def test_degenerate_data_gives_nan():
    p = torch.tensor([0.1, 0.2, 0.3])
    zeros, ones = torch.zeros(3), torch.ones(3)
    assert math.isnan(ne(p, zeros, 0.0)) and math.isnan(ne(p, ones, 1.0))
    assert math.isnan(ne_eval_base(p, zeros))
    assert math.isnan(auc(p, zeros)) and math.isnan(auc(p, ones))
    assert math.isnan(calibration(p, zeros))
    empty = torch.zeros(0)
    assert all(math.isnan(f(empty, empty)) for f in (logloss, auc, calibration, ne_eval_base))
    assert math.isnan(ne(empty, empty, 0.1))
    metrics = StreamingBinaryMetrics().compute(train_base_rate=0.1)  # no updates at all
    assert metrics["n"] == 0 and all(math.isnan(v) for k, v in metrics.items() if k != "n")
    m = StreamingBinaryMetrics()
    m.update(p=p, y=zeros)
    metrics = m.compute(train_base_rate=0.0)
    assert math.isnan(metrics["ne"]) and math.isnan(metrics["auc"]) and math.isnan(metrics["calibration"])
    assert metrics["logloss"] == pytest.approx(logloss(p, zeros))


def test_streaming_equals_functions_on_concatenation():
    p, y = data(n=30_000)
    m = StreamingBinaryMetrics()
    for chunk_p, chunk_y in zip(p.split(7_000), y.split(7_000), strict=True):
        m.update(p=chunk_p, y=chunk_y)
    base = 0.04
    got = m.compute(train_base_rate=base)
    assert got["n"] == 30_000
    assert got["ne"] == pytest.approx(ne(p, y, base), abs=1e-6)
    assert got["ne_eval_base"] == pytest.approx(ne_eval_base(p, y), abs=1e-6)
    assert got["logloss"] == pytest.approx(logloss(p, y), abs=1e-6)
    assert got["calibration"] == pytest.approx(calibration(p, y), abs=1e-9)
    assert got["ctr"] == pytest.approx(float(y.double().mean()), abs=1e-12)
    assert got["mean_p"] == pytest.approx(float(p.double().mean()), abs=1e-9)
    assert got["auc"] == pytest.approx(roc_auc_score(y.numpy(), p.numpy()), abs=1e-3)
    assert m.states["pos_hist"].numel() == 2**14, "memory is fixed, not per update"


def test_merge_of_halves_equals_whole():
    p, y = data(n=10_000, seed=3)
    whole, a, b = StreamingBinaryMetrics(), StreamingBinaryMetrics(), StreamingBinaryMetrics()
    whole.update(p=p, y=y)
    a.update(p=p[:4_000], y=y[:4_000])
    b.update(p=p[4_000:], y=y[4_000:])
    a.merge(b)
    got, want = a.compute(train_base_rate=0.05), whole.compute(train_base_rate=0.05)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    assert np.array_equal(a.states["pos_hist"].numpy(), whole.states["pos_hist"].numpy())
