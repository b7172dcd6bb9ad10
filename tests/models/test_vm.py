"""The VM students: shapes, gradients, the FM / FmFM interaction math, Gradient Scaling (GS)."""

import pytest
import torch

from models.losses import DistillConfig, vm_loss
from models.vm import VerticalModel, VMConfig

TINY = dict(buckets=32, embed_dim=4, mlp_dims=(8,), head_dims=(6,))
HEADS = ("serving_head.", "aux_head.", "sa_head.")


def batch(n_categorical: int, n_dense: int, B: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    categorical = torch.randint(0, 32, (B, n_categorical), generator=g)
    dense = torch.randn(B, n_dense, generator=g)
    y = torch.randint(0, 2, (B,), generator=g).float()
    teacher_prob = torch.rand(B, generator=g) * 0.2
    return categorical, dense, y, teacher_prob


@pytest.mark.parametrize("arch", ["fm", "fmfm", "deepfm"])
@pytest.mark.parametrize(("n_categorical", "n_dense"), [(3, 2), (3, 0), (0, 2)])
def test_vm_shapes_and_finite_gradients(arch, n_categorical, n_dense):
    torch.manual_seed(0)
    model = VerticalModel(
        VMConfig(arch=arch, n_categorical=n_categorical, n_dense=n_dense, sa_head=True, **TINY)
    )
    categorical, dense, _, _ = batch(n_categorical, n_dense)
    out = model(categorical, dense)
    assert set(out) == {"logit", "aux_logit", "sa_logit"}
    assert all(v.shape == (6,) for v in out.values())
    assert model.backbone(categorical, dense).shape == (6, model.out_dim)
    sum(v.sum() for v in out.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad.to_dense()).all(), name


def test_no_sa_head_by_default():
    model = VerticalModel(VMConfig(n_categorical=2, n_dense=1, **TINY))
    assert set(model(*batch(2, 1)[:2])) == {"logit", "aux_logit"}


def field_embeddings(model: VerticalModel, categorical, dense):
    v = model.embedding(categorical)  # (B, F, E)
    return torch.cat([v, model.dense_embed(dense)[:, None]], dim=1)  # (B, F+1, E)


def test_fm_backbone_is_first_order_plus_pairwise_sum():
    torch.manual_seed(0)
    model = VerticalModel(VMConfig(arch="fm", n_categorical=3, n_dense=2, **TINY))
    categorical, dense, _, _ = batch(3, 2)
    v = field_embeddings(model, categorical, dense)  # (B, 4, E)
    pairs = sum(v[:, i] * v[:, j] for i in range(4) for j in range(i + 1, 4))  # (B, E)
    first = model.first_order(categorical).sum(dim=(1, 2)) + model.dense_first_order(dense)[:, 0]  # (B,)
    x = model.backbone(categorical, dense)
    torch.testing.assert_close(x, torch.cat([first[:, None], pairs], dim=1))


def test_fmfm_backbone_is_field_matrixed_pairwise():
    torch.manual_seed(0)
    model = VerticalModel(VMConfig(arch="fmfm", n_categorical=3, n_dense=2, **TINY))
    with torch.no_grad():
        model.pair_matrix.normal_()  # away from the identity init
    categorical, dense, _, _ = batch(3, 2)
    v = field_embeddings(model, categorical, dense)  # (B, 4, E)
    index = {(i, j): k for k, (i, j) in enumerate((i, j) for i in range(4) for j in range(i + 1, 4))}
    assert model.pair_matrix.shape == (len(index), 4, 4)
    x = model.backbone(categorical, dense)
    for (i, j), k in index.items():
        expected = torch.einsum("be,ef,bf->b", v[:, i], model.pair_matrix[k], v[:, j])  # v_i^T M_ij v_j
        torch.testing.assert_close(x[:, 1 + k], expected)


def test_fmfm_starts_as_fm_dot_products():
    torch.manual_seed(0)
    model = VerticalModel(VMConfig(arch="fmfm", n_categorical=3, n_dense=0, **TINY))
    categorical, dense, _, _ = batch(3, 0)
    v = model.embedding(categorical)  # (B, 3, E)
    dots = torch.stack([(v[:, i] * v[:, j]).sum(1) for i, j in [(0, 1), (0, 2), (1, 2)]], dim=1)  # (B, 3)
    torch.testing.assert_close(model.backbone(categorical, dense)[:, 1:], dots)


def grads(model: VerticalModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["fm", "fmfm", "deepfm"])
def test_gradient_scaling(arch):
    torch.manual_seed(0)
    cfg = dict(arch=arch, n_categorical=3, n_dense=2, **TINY)
    # float64: in float32, summing 3*a + 3*b rounds differently from 3*(a + b) on cancelling terms.
    m1 = VerticalModel(VMConfig(beta=1.0, **cfg)).double()
    m3 = VerticalModel(VMConfig(beta=3.0, **cfg)).double()
    m3.load_state_dict(m1.state_dict())
    categorical, dense, y, teacher_prob = batch(3, 2, B=16)
    dense = dense.double()
    dcfg = DistillConfig(method="ah", w=0.7, alpha=2.0)

    def parts(model):
        losses = vm_loss(model(categorical, dense), y, teacher_prob, dcfg)
        return losses, dcfg.w * losses["loss_d"]

    # Distillation loss alone: 3x on every backbone parameter, unchanged on the aux head itself.
    g1, g3 = grads(m1, parts(m1)[1]), grads(m3, parts(m3)[1])
    backbone = [n for n in g1 if not n.startswith(HEADS)]
    assert backbone and all(g1[n].abs().sum() > 0 for n in backbone)
    for n in backbone:
        torch.testing.assert_close(g3[n], 3 * g1[n], rtol=1e-5, atol=0)
    for n in g1:
        if n.startswith("aux_head."):
            torch.testing.assert_close(g3[n], g1[n], rtol=1e-5, atol=0)
        if n.startswith("serving_head."):
            assert not g1[n].any() and not g3[n].any(), "L_d must not reach the serving head"

    # Serving loss alone: beta changes nothing.
    s1, s3 = grads(m1, parts(m1)[0]["loss_s"]), grads(m3, parts(m3)[0]["loss_s"])
    for n in s1:
        torch.testing.assert_close(s3[n], s1[n], rtol=1e-5, atol=0)

    # Total loss: serving head unchanged, backbone = serving part + beta * distillation part.
    t1, t3 = grads(m1, parts(m1)[0]["loss"]), grads(m3, parts(m3)[0]["loss"])
    for n in t1:
        if n.startswith("serving_head."):
            torch.testing.assert_close(t3[n], t1[n], rtol=1e-5, atol=0)
    for n in backbone:
        torch.testing.assert_close(t3[n], s1[n] + 3 * g1[n], rtol=1e-5, atol=1e-9)
