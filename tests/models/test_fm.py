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
    assert set(out) == {"logit"} and out["logit"].shape == (6,)
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
