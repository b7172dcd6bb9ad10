"""Feature encoding and streaming batches, shared by the FM and the VMs.

No file layout here: batches come from any iterator of Arrow record batches (the jobs feed it
the files of one Delta day, in arrival order), so memory holds one batch, never a day.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

MISSING = 0  # bucket of a null categorical value; real values hash into [1, buckets)


@dataclass
class FeatureEncoder:
    """Categorical ids -> hashed buckets, dense values -> normalised value + presence mask.

    - Hashing is SipHash keyed by the seed (``pandas.util.hash_array``): stable across
      processes and machines, and an id never seen before (new users and ads every day)
      simply lands in a bucket; no vocabulary to grow.
    - Dense values are compressed with sign(x)·log1p(|x|), then standardised with running
      statistics (Welford) that training updates batch by batch and a snapshot saves, so a
      model continued the next day keeps its input scale. A null becomes 0 with mask 0.
    """

    categorical: tuple[str, ...]
    dense: tuple[str, ...]
    buckets: int = 2**14
    seed: int = 0
    count: list[float] = field(default_factory=list)  # per dense feature: values seen
    mean: list[float] = field(default_factory=list)
    m2: list[float] = field(default_factory=list)  # sum of squared deviations

    def __post_init__(self) -> None:
        self.categorical, self.dense = tuple(self.categorical), tuple(self.dense)
        assert self.buckets >= 2, f"need at least one bucket besides MISSING, got {self.buckets}"
        n = len(self.dense)
        self.count = list(self.count) or [0.0] * n
        self.mean = list(self.mean) or [0.0] * n
        self.m2 = list(self.m2) or [0.0] * n
        assert len(self.count) == len(self.mean) == len(self.m2) == n, "dense stats do not match features"

    @property
    def n_dense_inputs(self) -> int:
        return 2 * len(self.dense)  # value and presence mask per dense feature

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.categorical, *self.dense)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> FeatureEncoder:
        return cls(**state)

    def _hash_key(self) -> str:
        return f"exfm{self.seed:012d}"[-16:]  # SipHash takes a 16-character key

    def encode(
        self, batch: pa.RecordBatch | pa.Table, *, update_stats: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(categorical (B, F) long, dense (B, 2·D) float) of a batch; absent columns count as null."""
        n = batch.num_rows
        cat = np.zeros((n, len(self.categorical)), dtype=np.int64)  # (B, F)
        for j, name in enumerate(self.categorical):
            values = _column(batch, name)
            if values is None:
                continue
            present = values.notna().to_numpy()
            hashed = pd.util.hash_array(values.astype(str).to_numpy(dtype=object), hash_key=self._hash_key())
            cat[:, j] = np.where(
                present, 1 + (hashed % np.uint64(self.buckets - 1)).astype(np.int64), MISSING
            )

        dense = np.zeros((n, self.n_dense_inputs), dtype=np.float32)  # (B, 2D)
        for j, name in enumerate(self.dense):
            values = _column(batch, name)
            if values is None:
                continue
            x = values.to_numpy(dtype=np.float64, na_value=np.nan)
            x = np.sign(x) * np.log1p(np.abs(x))
            present = np.isfinite(x)
            if update_stats and present.any():
                self._update(j, x[present])
            std = np.sqrt(self.m2[j] / self.count[j]) if self.count[j] > 1 else 1.0
            z = (x - self.mean[j]) / max(std, 1e-6)
            dense[:, 2 * j] = np.where(present, z, 0.0)
            dense[:, 2 * j + 1] = present
        return torch.from_numpy(cat), torch.from_numpy(dense)

    def _update(self, j: int, x: np.ndarray) -> None:
        """Chan et al.'s parallel Welford merge of a batch into the running stats."""
        n_b, mean_b, m2_b = float(x.size), float(x.mean()), float(((x - x.mean()) ** 2).sum())
        n_a, mean_a = self.count[j], self.mean[j]
        n = n_a + n_b
        delta = mean_b - mean_a
        self.mean[j] = mean_a + delta * n_b / n
        self.m2[j] = self.m2[j] + m2_b + delta**2 * n_a * n_b / n
        self.count[j] = n


def _column(batch: pa.RecordBatch | pa.Table, name: str) -> pd.Series | None:
    idx = batch.schema.get_field_index(name)
    return None if idx < 0 else batch.column(idx).to_pandas()


@dataclass(frozen=True)
class Batch:
    categorical: torch.Tensor  # (B, F) long
    dense: torch.Tensor  # (B, 2D) float
    label: torch.Tensor  # (B,) float
    teacher: torch.Tensor | None  # (B,) teacher probability, when the rows carry one
    size: int


def rebatch(batches: Iterable[pa.RecordBatch], batch_size: int) -> Iterator[pa.Table]:
    """Fixed-size tables from record batches of any size (the last one may be smaller)."""
    pending: list[pa.RecordBatch] = []
    rows = 0
    for rb in batches:
        pending.append(rb)
        rows += rb.num_rows
        while rows >= batch_size:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, batch_size)
            rest = table.slice(batch_size)
            pending, rows = rest.to_batches(), rest.num_rows
    if rows:
        yield pa.Table.from_batches(pending)


def stream_batches(
    batches: Iterable[pa.RecordBatch],
    encoder: FeatureEncoder,
    *,
    label: str,
    batch_size: int,
    teacher: str | None = None,
    update_stats: bool = False,
) -> Iterator[Batch]:
    """Encoded training batches, in the order the record batches arrive."""
    for table in rebatch(batches, batch_size):
        cat, dense = encoder.encode(table, update_stats=update_stats)
        y = torch.from_numpy(table.column(label).to_numpy(zero_copy_only=False).astype(np.float32))
        t = None
        if teacher is not None:
            t = torch.from_numpy(table.column(teacher).to_numpy(zero_copy_only=False).astype(np.float32))
        yield Batch(cat, dense, y, t, table.num_rows)
