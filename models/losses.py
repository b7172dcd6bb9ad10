"""Training losses of the FM, the VM and the Student Adapter (paper Eqns 1-7, Algorithm 1).

``h(ŷ, y)`` (Eq 1) is the mean binary cross-entropy on logits ``ŷ``; its target may be a soft
probability (the FM's pseudo-label). Components are returned unweighted, next to the total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("none", "kd", "ah", "ah_sa")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    method: str = "ah"  # one of METHODS
    w: float = 1.0  # LW: weight of the distillation loss L_d (ah, ah_sa)
    alpha: float = 1.0  # LS: the AH target is min(alpha * ŷᶠ, 1) (ah, ah_sa)

    def __post_init__(self) -> None:
        assert self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"
        assert self.w >= 0 and self.alpha > 0, f"{self.w=} {self.alpha=}"


def h(logit: Tensor, target: Tensor) -> Tensor:
    """Eq 1: mean binary cross-entropy of ``logit`` (B,) against a (soft) ``target`` (B,)."""
    assert logit.shape == target.shape, f"logit {logit.shape} vs target {target.shape}"
    return F.binary_cross_entropy_with_logits(logit, target.to(logit.dtype))


def scaled_label(teacher_prob: Tensor, alpha: float) -> Tensor:
    """LS (§3.3): ``alpha * ŷᶠ`` clipped so that it stays a probability (≤ 1)."""
    return (alpha * teacher_prob).clamp(max=1.0)


def vm_loss(
    out: dict[str, Tensor],
    y: Tensor,
    teacher_prob: Tensor | None,
    cfg: DistillConfig,
    adapter_prob: Tensor | None = None,
) -> dict[str, Tensor]:
    """The VM's loss for ``cfg.method``; ``out`` is a VerticalModel output, ``y`` the labels (B,).

    - none: ``h(ŷˢ, y)``; ``teacher_prob`` is not read at all (may be None).
    - kd (Eq 2): ``h(ŷˢ, y) + h(ŷˢ, ŷᶠ)``, both on the serving head.
    - ah (Eq 5): ``L_s + w * L_d`` with ``L_s = h(ŷˢ, y)`` (Eq 3) and ``L_d = h(ŷᴰ, min(α·ŷᶠ, 1))`` (Eq 4).
    - ah_sa (Algorithm 1 step 3): Eq 5 + ``L_sa = h(ŷ_sa, SG(ŷˢᴬ))`` (Eq 7) on the separate SA head;
      ``adapter_prob`` is σ(StudentAdapter output) and is detached here, so no VM gradient reaches SA.

    Returns ``{"loss": total, "loss_s": ..., and "loss_kd" | "loss_d" [, "loss_sa"]}`` (unweighted parts).
    """
    losses = {"loss_s": h(out["logit"], y)}  # Eq 3: the serving head sees only the true labels
    if cfg.method == "none":
        losses["loss"] = losses["loss_s"]
        return losses

    assert teacher_prob is not None, f"method {cfg.method!r} needs the FM's teacher_prob"
    if cfg.method == "kd":
        losses["loss_kd"] = h(out["logit"], teacher_prob)  # Eq 2: same head, so FM bias reaches ŷˢ
        losses["loss"] = losses["loss_s"] + losses["loss_kd"]
        return losses

    losses["loss_d"] = h(out["aux_logit"], scaled_label(teacher_prob, cfg.alpha))  # Eq 4 with LS
    total = losses["loss_s"] + cfg.w * losses["loss_d"]  # Eq 5 with LW
    if cfg.method == "ah_sa":
        assert "sa_logit" in out, "method 'ah_sa' needs a VM built with VMConfig(sa_head=True)"
        assert adapter_prob is not None, "method 'ah_sa' needs the Student Adapter's adapter_prob"
        losses["loss_sa"] = h(out["sa_logit"], adapter_prob.detach())  # Eq 7: SG(ŷˢᴬ)
        total = total + losses["loss_sa"]
    losses["loss"] = total
    return losses


def adapter_loss(adapter_logit: Tensor, y: Tensor) -> Tensor:
    """Eq 6: ``h(ŷˢᴬ, y)``, the Student Adapter fitted to fresh labels (Algorithm 1 step 1)."""
    return h(adapter_logit, y)


def fm_loss(task_logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """The FM's loss over its tasks: binary cross-entropy of every (request, task) that has a label.

    ``task_logits`` (B, T); ``y`` (B, T) labels, NaN where the request has no label of that task
    (no VM that logged it has that task). Summed over tasks and labelled rows, divided by B for
    ``"mean"`` (so one task is the mean BCE, and a rarer task weighs by its share of the rows);
    ``"sum"`` leaves the division to the caller (data parallelism divides by the global batch).
    """
    assert task_logits.shape == y.shape, f"task_logits {task_logits.shape} vs y {y.shape}"
    labelled = ~torch.isnan(y)  # (B, T)
    bce = F.binary_cross_entropy_with_logits(task_logits, torch.where(labelled, y, 0.0), reduction="none")
    total = torch.where(labelled, bce, 0.0).sum()
    return total / y.shape[0] if reduction == "mean" else total
