"""The Student Adapter: identity at init, untouched by Eq 7 (stop-gradient), trained by Eq 6."""

import torch

from models.heads import AdapterConfig, StudentAdapter
from models.losses import DistillConfig, adapter_loss, vm_loss
from models.vm import VerticalModel, VMConfig


def test_adapter_starts_as_identity_on_teacher_logit():
    torch.manual_seed(0)
    adapter = StudentAdapter(AdapterConfig())
    p = torch.tensor([1e-4, 0.01, 0.3, 0.5, 0.97])
    torch.testing.assert_close(adapter(p), torch.logit(p), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(adapter(torch.tensor([0.0, 1.0]))).all(), "extreme teacher scores are clamped"


def test_eq7_never_updates_adapter_but_eq6_does():
    torch.manual_seed(0)
    B = 32
    categorical, dense = torch.randint(0, 32, (B, 3)), torch.randn(B, 2)
    y, teacher_prob = torch.randint(0, 2, (B,)).float(), torch.rand(B) * 0.3
    vm = VerticalModel(VMConfig(n_categorical=3, n_dense=2, buckets=32, sa_head=True))
    adapter = StudentAdapter(AdapterConfig())
    opt = torch.optim.SGD([*vm.parameters(), *adapter.parameters()], lr=0.5)

    # Algorithm 1 step 3: Eq 5 + Eq 7 with the adapter's (graph-connected) output passed in.
    before = [p.detach().clone() for p in adapter.parameters()]
    adapter_prob = torch.sigmoid(adapter(teacher_prob))
    losses = vm_loss(vm(categorical, dense), y, teacher_prob, DistillConfig(method="ah_sa"), adapter_prob)
    opt.zero_grad()
    losses["loss"].backward()
    opt.step()
    assert all(p.grad is None for p in adapter.parameters()), "SG(ŷˢᴬ): no gradient may reach SA"
    assert all(torch.equal(a, p) for a, p in zip(before, adapter.parameters(), strict=True))
    assert vm.sa_head.net[0].weight.grad.abs().sum() > 0, "Eq 7 trains the VM's SA head"

    # Algorithm 1 step 1: Eq 6 updates the adapter.
    opt.zero_grad()
    adapter_loss(adapter(teacher_prob), y).backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, adapter.parameters(), strict=True))
