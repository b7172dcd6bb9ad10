"""Shared blocks: embedding offsets, MLP, the two cross-network formulas, gradient scaling."""

import torch

from models.layers import MLP, CrossNet, CrossNetV2, FeatureEmbedding, grad_scale, num_parameters


def test_feature_embedding_rows_are_per_field():
    torch.manual_seed(0)
    emb = FeatureEmbedding(n_fields=3, buckets=5, dim=4)
    ids = torch.tensor([[0, 0, 4], [2, 2, 0]])  # (B=2, F=3); the same id in two fields
    out = emb(ids)  # (2, 3, 4)
    assert out.shape == (2, 3, 4)
    for b in range(2):
        for f in range(3):
            torch.testing.assert_close(out[b, f], emb.weight[f * 5 + ids[b, f]])
    assert not torch.equal(out[0, 0], out[0, 1]), "id 0 of field 0 and of field 1 must differ"
    assert num_parameters(emb) == 3 * 5 * 4 and "offsets" not in emb.state_dict()


def test_feature_embedding_no_fields():
    out = FeatureEmbedding(n_fields=0, buckets=5, dim=4)(torch.zeros(7, 0, dtype=torch.long))
    assert out.shape == (7, 0, 4)


def test_mlp_widths():
    x = torch.randn(4, 10)
    assert MLP(10, (8, 6), out_dim=1)(x).shape == (4, 1)
    assert MLP(10, (8, 6), out_dim=None).out_features == 6
    torch.testing.assert_close(MLP(10, (), out_dim=None)(x), x)  # empty MLP is the identity


def test_crossnet_matches_formula():
    torch.manual_seed(0)
    net = CrossNet(dim=5, layers=2)
    for b in net.b:
        torch.nn.init.normal_(b)  # non-zero biases so they are checked too
    x0 = torch.randn(3, 5)
    x = x0
    for lin, b in zip(net.w, net.b, strict=True):
        w = lin.weight[0]  # (5,)
        x = x0 * (x @ w)[:, None] + b + x  # x_{l+1} = x0 (x_l · w_l) + b_l + x_l
    torch.testing.assert_close(net(x0), x)
    assert num_parameters(net) == 2 * (5 + 5)


def test_crossnet_v2_matches_formula():
    torch.manual_seed(0)
    net = CrossNetV2(dim=5, layers=2)
    x0 = torch.randn(3, 5)
    x = x0
    for lin in net.layers:
        x = x0 * (x @ lin.weight.T + lin.bias) + x  # x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l
    torch.testing.assert_close(net(x0), x)
    assert num_parameters(net) == 2 * (25 + 5)


def test_grad_scale_identity_forward_scaled_backward():
    x = torch.randn(4, 3, requires_grad=True)
    y = grad_scale(x, 2.5)
    assert torch.equal(y, x)
    (y * torch.arange(12.0).view(4, 3)).sum().backward()
    torch.testing.assert_close(x.grad, 2.5 * torch.arange(12.0).view(4, 3))
