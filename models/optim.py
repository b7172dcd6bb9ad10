"""The optimizer split of production recommenders: Adagrad on the embedding tables, Adam on the rest.

A hashed id table is large and a batch touches a few of its rows. With sparse gradients
(``FeatureEmbedding(sparse=True)``) Adagrad updates exactly those rows and their accumulators,
so a step costs what the batch looked up, not the table's size; rows of rare ids keep a large
step size and frequent ones a small one, the reason CTR models train their tables with it
(torchrec's fused row-wise Adagrad is the reference idea; this is torch's own element-wise one).
Every other parameter (MLPs, cross layers, heads) is dense and keeps Adam.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers import FeatureEmbedding


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 1e-3  # Adam, dense layers
    embedding_lr: float = 0.05  # Adagrad, embedding tables

    def __post_init__(self) -> None:
        assert self.lr > 0 and self.embedding_lr > 0, f"learning rates must be > 0: {self}"


def embedding_tables(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the model's sparse embedding tables (empty tables left out)."""
    return [
        m.weight for m in model.modules() if isinstance(m, FeatureEmbedding) and m.sparse and m.weight.numel()
    ]


class SplitOptimizer:
    """Adagrad (sparse rows) for ``embedding_tables(model)``, Adam for every other parameter.

    ``load_state_dict`` restores both states (accumulators, moments, step counts) and then sets
    the learning rates of ``config``: a model continued on a new day trains with the rates it
    is given today, not with the ones saved yesterday.
    """

    def __init__(self, model: nn.Module, config: OptimConfig) -> None:
        self.config = config
        # Opt out of per-step invariant checks of sparse tensors explicitly (torch warns otherwise):
        # the sparse gradients come from F.embedding and are valid by construction.
        torch.sparse.check_sparse_tensor_invariants.disable()
        tables = embedding_tables(model)
        ids = {id(p) for p in tables}
        rest = [p for p in model.parameters() if id(p) not in ids]
        self.embedding = None
        if tables:
            self.embedding = torch.optim.Adagrad(tables, lr=config.embedding_lr)
        self.dense = torch.optim.Adam(rest, lr=config.lr)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.embedding, self.dense) if o is not None]

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {
            "embedding": None if self.embedding is None else self.embedding.state_dict(),
            "dense": self.dense.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        assert (state["embedding"] is None) == (self.embedding is None), (
            "embedding tables do not match the state"
        )
        if self.embedding is not None:
            self.embedding.load_state_dict(state["embedding"])
        self.dense.load_state_dict(state["dense"])
        for optimizer, lr in ((self.embedding, self.config.embedding_lr), (self.dense, self.config.lr)):
            for group in optimizer.param_groups if optimizer is not None else ():
                group["lr"] = lr


def allreduce_grads(model: nn.Module, rows: float) -> None:
    """Data parallelism without DDP: every rank's gradient of its summed loss, summed over the ranks
    and divided by the step's ``rows`` (all ranks'), so each replica steps with the gradient of
    the mean loss over the global batch. DDP's buckets do not take the sparse gradients of the
    embedding tables; gloo all-reduces them as sparse tensors. A rank without a batch this step
    (the day's last one) contributes zeros.
    """
    import torch.distributed as dist

    sparse = {id(p) for p in embedding_tables(model)}
    dense = [p for p in model.parameters() if id(p) not in sparse]
    for p in dense:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in dense])  # one all-reduce for every dense layer
    dist.all_reduce(flat)
    flat /= rows
    for p, g in zip(dense, flat.split([p.numel() for p in dense]), strict=True):
        p.grad.copy_(g.view_as(p))
    for p in embedding_tables(model):
        g = p.grad
        if g is None:
            index = torch.zeros(1, 0, dtype=torch.long)
            g = torch.sparse_coo_tensor(index, p.new_zeros(0, *p.shape[1:]), p.shape)
        g = g.coalesce()
        dist.all_reduce(g)
        p.grad = (g / rows).coalesce()
