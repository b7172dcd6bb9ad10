"""The FM teacher: shapes, finite gradients, optional feature kinds, size relative to a VM."""

import pytest
import torch

from models.fm import FMConfig, FoundationModel
from models.layers import num_parameters
from models.vm import VerticalModel, VMConfig

TINY = dict(buckets=32, embed_dim=4, cross_layers=2, mlp_dims=(16, 8))


def batch(n_categorical: int, n_dense: int, buckets: int = 32, B: int = 6):
    return torch.randint(0, buckets, (B, n_categorical)), torch.randn(B, n_dense)


@pytest.mark.parametrize("arch", ["dcnv2", "dcn"])
@pytest.mark.parametrize(("n_categorical", "n_dense"), [(3, 2), (3, 0), (0, 2)])
def test_fm_shapes_and_finite_gradients(arch, n_categorical, n_dense):
    torch.manual_seed(0)
    model = FoundationModel(FMConfig(arch=arch, n_categorical=n_categorical, n_dense=n_dense, **TINY))
    out = model(*batch(n_categorical, n_dense))
    assert set(out) == {"logit", "task_logits"} and out["logit"].shape == (6,)
    assert out["task_logits"].shape == (6, 1)
    out["logit"].sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad.to_dense()).all(), name


def test_fm_is_deterministic_given_seed():
    cfg = FMConfig(n_categorical=3, n_dense=2, **TINY)
    torch.manual_seed(1)
    a = FoundationModel(cfg)
    torch.manual_seed(1)
    b = FoundationModel(cfg)
    x = batch(3, 2)
    torch.testing.assert_close(a(*x)["logit"], b(*x)["logit"], rtol=0, atol=0)


def test_fm_arch_is_checked():
    with pytest.raises(AssertionError, match="arch must be one of"):
        FMConfig(arch="dmin", n_categorical=3, n_dense=0)


def test_default_fm_is_larger_than_default_vm():
    fm = FoundationModel(FMConfig(n_categorical=8, n_dense=4))
    vm = VerticalModel(VMConfig(n_categorical=8, n_dense=4))
    assert num_parameters(fm) > num_parameters(vm)


def test_fm_has_one_head_per_task_sharing_the_rest():
    torch.manual_seed(0)
    priors = (0.05, 0.2, 0.01)
    model = FoundationModel(FMConfig(n_categorical=3, n_dense=2, n_tasks=3, prior_ctr=priors, **TINY))
    out = model(*batch(3, 2))
    assert out["task_logits"].shape == (6, 3)
    torch.testing.assert_close(out["logit"], out["task_logits"][:, 0])
    torch.testing.assert_close(torch.sigmoid(model.out.bias), torch.tensor(priors))  # each head's prior
    # Hard sharing: one task's loss reaches the shared layers but no other task's output weights.
    out["task_logits"][:, 1].sum().backward()
    assert model.out.weight.grad[[0, 2]].abs().sum() == 0 and model.out.weight.grad[1].abs().sum() > 0
    assert model.deep.net[0].weight.grad.abs().sum() > 0
