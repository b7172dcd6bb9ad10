"""The Student Adapter (SA, paper §3.4): ŷˢᴬ = MLP(ŷᶠ), trained on fresh labels by Eq 6."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.layers import MLP

PROB_EPS = 1e-6  # keeps logit(p) finite for teacher scores of exactly 0 or 1


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    hidden: tuple[int, ...] = (16, 16)  # hidden widths of the residual MLP


class StudentAdapter(nn.Module):
    """Maps the teacher's probability ŷᶠ (B,) to an adapted logit ŷˢᴬ (B,).

    ``out = z + MLP(z)`` with ``z = logit(clamp(ŷᶠ))``: the MLP sees the teacher logit because it
    is better conditioned than a probability near 0, and the residual form with a zero-initialised
    last layer makes an untrained adapter pass the teacher through unchanged.
    """

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.mlp = MLP(1, config.hidden, out_dim=1)
        last = self.mlp.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, teacher_prob: Tensor) -> Tensor:
        assert teacher_prob.dim() == 1, f"want teacher probabilities (B,), got {teacher_prob.shape}"
        z = torch.logit(teacher_prob.clamp(PROB_EPS, 1 - PROB_EPS))  # (B,)
        return z + self.mlp(z[:, None]).squeeze(-1)  # (B,) logit
