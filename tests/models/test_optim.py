"""The optimizer split: sparse Adagrad rows for embedding tables, Adam for the rest, exact resume."""

import copy

import torch
import torch.nn.functional as F

from models.fm import FMConfig, FoundationModel
from models.optim import OptimConfig, SplitOptimizer, embedding_tables
from models.vm import VerticalModel, VMConfig


def _batch(seed, n=64, fields=3, buckets=50):
    g = torch.Generator().manual_seed(seed)
    cat = torch.randint(0, buckets, (n, fields), generator=g)
    return cat, torch.randn(n, 4, generator=g), (torch.rand(n, generator=g) < 0.3).float()


def _step(model, optimizer, seed):
    cat, dense, y = _batch(seed)
    loss = F.binary_cross_entropy_with_logits(model(cat, dense)["logit"], y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return cat


def test_tables_get_sparse_adagrad_and_only_touched_rows_change():
    torch.manual_seed(0)
    model = VerticalModel(VMConfig(arch="deepfm", n_categorical=3, n_dense=4, buckets=50))
    optimizer = SplitOptimizer(model, OptimConfig(lr=1e-3, embedding_lr=0.1))
    tables = embedding_tables(model)
    assert {id(p) for p in tables} == {id(model.embedding.weight), id(model.first_order.weight)}
    assert isinstance(optimizer.embedding, torch.optim.Adagrad) and isinstance(
        optimizer.dense, torch.optim.Adam
    )
    dense_ids = {id(p) for g in optimizer.dense.param_groups for p in g["params"]}
    assert dense_ids.isdisjoint({id(p) for p in tables})
    assert len(dense_ids) + len(tables) == len(list(model.parameters()))

    before = model.embedding.weight.detach().clone()
    cat = _step(model, optimizer, seed=1)
    touched = torch.zeros(model.embedding.weight.shape[0], dtype=torch.bool)
    touched[(cat + model.embedding.offsets).flatten()] = True
    changed = (model.embedding.weight.detach() != before).any(dim=1)
    assert changed[touched].all() and not changed[~touched].any()


def test_tables_gradients_are_sparse():
    model = FoundationModel(FMConfig(n_categorical=3, n_dense=4, buckets=50, mlp_dims=(8,)))
    cat, dense, y = _batch(0)
    F.binary_cross_entropy_with_logits(model(cat, dense)["logit"], y).backward()
    assert model.embedding.weight.grad.is_sparse
    assert not any(p.grad.is_sparse for n, p in model.named_parameters() if n != "embedding.weight")


def test_state_restores_both_optimizers_exactly_and_takes_the_new_learning_rates():
    torch.manual_seed(0)
    model = FoundationModel(FMConfig(n_categorical=3, n_dense=4, buckets=50, mlp_dims=(8,)))
    optimizer = SplitOptimizer(model, OptimConfig(lr=1e-3, embedding_lr=0.05))
    for seed in range(3):
        _step(model, optimizer, seed)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())

    for seed in range(3, 6):  # the run that never stopped
        _step(model, optimizer, seed)

    restored = FoundationModel(FMConfig(n_categorical=3, n_dense=4, buckets=50, mlp_dims=(8,)))
    restored.load_state_dict(saved_model)
    resumed = SplitOptimizer(restored, OptimConfig(lr=1e-3, embedding_lr=0.05))
    resumed.load_state_dict(saved_opt)
    for seed in range(3, 6):
        _step(restored, resumed, seed)
    for name, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name

    changed = SplitOptimizer(restored, OptimConfig(lr=5e-4, embedding_lr=0.2))
    changed.load_state_dict(saved_opt)  # yesterday's state, today's learning rates
    assert [g["lr"] for g in changed.dense.param_groups] == [5e-4]
    assert [g["lr"] for g in changed.embedding.param_groups] == [0.2]
    assert torch.equal(
        changed.embedding.state_dict()["state"][0]["sum"], saved_opt["embedding"]["state"][0]["sum"]
    )
