"""VM losses against hand-written formulas (Eqns 1-7)."""

import pytest
import torch

from models.losses import METHODS, DistillConfig, adapter_loss, fm_loss, scaled_label, vm_loss


def bce(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq 1 by hand (sign flipped to a loss), mean over the batch."""
    s = torch.sigmoid(logit)
    return -(target * s.log() + (1 - target) * (1 - s).log()).mean()


def make(B: int = 8, seed: int = 0, sa: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = {
        "logit": torch.randn(B, generator=g, requires_grad=True),
        "aux_logit": torch.randn(B, generator=g, requires_grad=True),
    }
    if sa:
        out["sa_logit"] = torch.randn(B, generator=g, requires_grad=True)
    y = torch.randint(0, 2, (B,), generator=g).float()
    teacher_prob = torch.rand(B, generator=g) * 0.4
    return out, y, teacher_prob


def test_scaled_label_clips_at_one():
    torch.testing.assert_close(scaled_label(torch.tensor([0.5, 0.05]), 10.0), torch.tensor([1.0, 0.5]))


def test_method_is_checked():
    assert METHODS == ("none", "kd", "ah", "ah_sa")
    with pytest.raises(AssertionError, match="method must be one of"):
        DistillConfig(method="dkd")


def test_none_ignores_teacher():
    results = []
    for teacher in (torch.zeros(8), torch.ones(8), None):
        out, y, _ = make()
        loss = vm_loss(out, y, teacher, DistillConfig(method="none"))["loss"]
        loss.backward()
        results.append((loss.detach(), out["logit"].grad, out["aux_logit"].grad))
    for loss, grad, aux_grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
        assert aux_grad is None and results[0][2] is None
    out, y, _ = make()
    torch.testing.assert_close(results[0][0], bce(out["logit"], y).detach())


def test_kd_is_eq2():
    out, y, t = make()
    losses = vm_loss(out, y, t, DistillConfig(method="kd", w=5.0, alpha=3.0))  # w, alpha: ah only
    torch.testing.assert_close(losses["loss"], bce(out["logit"], y) + bce(out["logit"], t))
    losses["loss"].backward()
    assert out["aux_logit"].grad is None, "kd supervises the serving head only"


def test_ah_is_eq5():
    out, y, t = make()
    losses = vm_loss(out, y, t, DistillConfig(method="ah", w=0.3, alpha=4.0))
    expected = bce(out["logit"], y) + 0.3 * bce(out["aux_logit"], (4.0 * t).clamp(max=1.0))
    torch.testing.assert_close(losses["loss"], expected)
    torch.testing.assert_close(losses["loss_s"], bce(out["logit"], y))


def test_ah_sa_is_eq5_plus_eq7_with_stop_gradient():
    out, y, t = make(sa=True)
    adapter_prob = torch.rand(8, requires_grad=True)
    losses = vm_loss(out, y, t, DistillConfig(method="ah_sa", w=0.3, alpha=2.0), adapter_prob=adapter_prob)
    eq5 = bce(out["logit"], y) + 0.3 * bce(out["aux_logit"], (2.0 * t).clamp(max=1.0))
    torch.testing.assert_close(losses["loss"], eq5 + bce(out["sa_logit"], adapter_prob.detach()))
    losses["loss"].backward()
    assert adapter_prob.grad is None


def test_ah_sa_needs_sa_head():
    out, y, t = make(sa=False)
    with pytest.raises(AssertionError, match="sa_head=True"):
        vm_loss(out, y, t, DistillConfig(method="ah_sa"), adapter_prob=t)


def test_adapter_loss_is_eq6():
    out, y, _ = make()
    torch.testing.assert_close(adapter_loss(out["logit"], y), bce(out["logit"], y))


def test_fm_loss_sums_the_labelled_tasks_of_each_request():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 2, generator=g)
    y = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [1.0, 1.0], [float("nan"), 0.0], [0.0, 0.0]])
    labelled = [(b, t) for b in range(5) for t in range(2) if not torch.isnan(y[b, t])]
    by_hand = sum(bce(logits[b, t : t + 1], y[b, t : t + 1]) for b, t in labelled)
    torch.testing.assert_close(fm_loss(logits, y, reduction="sum"), by_hand)
    torch.testing.assert_close(fm_loss(logits, y), by_hand / 5)  # over the batch's requests
    one_task = y[:, :1].nan_to_num(0.0)  # a single task without gaps: the mean BCE of Eq 1
    torch.testing.assert_close(fm_loss(logits[:, :1], one_task), bce(logits[:, 0], one_task[:, 0]))
