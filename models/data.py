"""Feature encoding and streaming batches, shared by the FM and the VMs.

No file layout here: batches come from any iterator of Arrow record batches (the jobs feed it
one Delta day, in arrival order), so memory holds one batch, never a day. Encoding is
vectorised over the batch's Arrow columns: no Python work per value.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

MISSING = 0  # bucket of a null or absent categorical value; real values hash into [1, buckets)
HASHING = "poly64-splitmix"  # the id -> bucket rule of hash_strings; every snapshot records it
_P = np.uint64(0x100000001B3)  # odd multiplier of the polynomial hash (FNV's 64-bit prime)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every input bit reaches every output bit (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_strings(values: pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """Seeded 64-bit hash (uint64) of each value's UTF-8 text; a null's hash is meaningless (mask it).

    ``h(s) = splitmix64(Σ_j s[j]·P^j + len(s)·P^len(s) + splitmix64(seed))`` over the bytes s[j],
    computed on Arrow's offset and data buffers with numpy: no Python work per value. The same
    text gives the same hash on every day, batch, process and machine.
    """
    values = pa.concat_arrays([_strings(values)])  # a slice's buffers start at its own first value
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[: len(values) + 1].astype(np.int64)
    data = (
        np.frombuffer(data_buf, dtype=np.uint8)[: offsets[-1]]
        if data_buf is not None
        else np.zeros(0, np.uint8)
    )
    lengths = np.diff(offsets)  # (N,)
    present = np.flatnonzero(np.bincount(lengths))
    powers = _powers(int(present[-1] if len(present) else 0) + 1)
    with np.errstate(over="ignore"):
        if len(present) <= _LENGTH_GROUPS:
            sums = _sums_by_length(data, offsets, lengths, present, powers)
        else:
            position = np.arange(len(data), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
            terms = data.astype(np.uint64) * powers[position]  # (bytes,)
            sums = np.zeros(len(values), dtype=np.uint64)
            nonempty = lengths > 0
            if nonempty.any():
                sums[nonempty] = np.add.reduceat(terms, offsets[:-1][nonempty])
        sums += lengths.astype(np.uint64) * powers[lengths]
        return _splitmix64(sums + _splitmix64(np.array([seed], dtype=np.uint64)))


# Ids come in few lengths (request ids in one): then each length's values are one (n, L) matrix
# times P^0..P^(L-1), 2-3x faster than per-byte positions and reduceat (the general path).
_LENGTH_GROUPS = 16


def _sums_by_length(data, offsets, lengths, present, powers) -> np.ndarray:
    sums = np.zeros(len(lengths), dtype=np.uint64)
    for n in present[present > 0]:
        if len(present) == 1:  # one length: the data buffer is the matrix
            rows, block = slice(None), data.reshape(-1, n)
        else:
            rows = np.flatnonzero(lengths == n)
            block = data[offsets[rows][:, None] + np.arange(n)]
        sums[rows] = (block.astype(np.uint64) * powers[:n]).sum(axis=1, dtype=np.uint64)
    return sums


def _distinct(column: pa.Array | pa.ChunkedArray) -> list[tuple[pa.Array, np.ndarray]]:
    """(values, index) per chunk of a categorical column: the chunk's rows are ``values[index]``.

    A dictionary-encoded chunk (Parquet's dictionary pages read as they are, see
    ``lakehouse.arrow_day``) gives its dictionary, so each distinct id is hashed once per chunk,
    not once per row; a null row's index is -1.
    """
    out = []
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        if pa.types.is_dictionary(chunk.type):
            index = chunk.indices.fill_null(-1).to_numpy().astype(np.int64)
            out.append((_strings(chunk.dictionary), index))
        else:
            out.append((_strings(chunk), np.arange(len(chunk), dtype=np.int64)))
    return out


def _strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One string array; ids logged as numbers hash as their text."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values if pa.types.is_string(values.type) else pc.cast(values, pa.string())


_POWERS = np.ones(1, dtype=np.uint64)


def _powers(n: int) -> np.ndarray:
    """P^0 .. P^(n-1) modulo 2^64, grown on demand and kept."""
    global _POWERS
    if len(_POWERS) < n:
        with np.errstate(over="ignore"):
            _POWERS = np.cumprod(
                np.concatenate([[1], np.full(max(n, 2 * len(_POWERS)) - 1, _P)]).astype(np.uint64)
            )
    return _POWERS


@dataclass
class FeatureEncoder:
    """Categorical ids -> hashed buckets, dense values -> normalised value + presence mask.

    - Bucket of a categorical value ``v``: ``1 + hash_strings(v, seed) mod (buckets - 1)``, or
      ``MISSING`` for a null or a feature the rows lack: stable across days, processes and
      machines, and an id never seen before (new users and ads every day) simply lands in a
      bucket; no vocabulary to grow.
    - Dense values are compressed with sign(x)·log1p(|x|), then standardised with running
      statistics (Welford) that training updates batch by batch and a snapshot saves, so a
      model continued the next day keeps its input scale. A null becomes 0 with mask 0.
    """

    categorical: tuple[str, ...]
    dense: tuple[str, ...]
    buckets: int = 2**14
    seed: int = 0
    hashing: str = HASHING
    count: list[float] = field(default_factory=list)  # per dense feature: values seen
    mean: list[float] = field(default_factory=list)
    m2: list[float] = field(default_factory=list)  # sum of squared deviations

    def __post_init__(self) -> None:
        self.categorical, self.dense = tuple(self.categorical), tuple(self.dense)
        assert self.buckets >= 2, f"need at least one bucket besides MISSING, got {self.buckets}"
        assert self.hashing == HASHING, f"ids hashed by {self.hashing!r}, this code hashes by {HASHING!r}"
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
        if state.get("hashing") != HASHING:
            raise ValueError(
                f"the snapshot's ids were hashed by {state.get('hashing', 'SipHash')}, today's by {HASHING}: "
                "its embedding rows do not match today's buckets; start a new chain with --fresh"
            )
        return cls(**state)

    def encode(
        self, batch: pa.RecordBatch | pa.Table, *, update_stats: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(categorical (B, F) long, dense (B, 2·D) float) of a batch; absent columns count as null."""
        n = batch.num_rows
        cat = np.full((n, len(self.categorical)), MISSING, dtype=np.int64)  # (B, F)
        present = [j for j, name in enumerate(self.categorical) if name in batch.schema.names]
        if present and n:
            # One hash call for every field of the batch (the per-call overhead is paid once), over
            # distinct values only where a column is dictionary-encoded (see _distinct).
            pieces = [p for j in present for p in _distinct(batch.column(self.categorical[j]))]
            starts = np.cumsum([0, *(len(v) for v, _ in pieces)])
            null_at = starts[-1]  # null rows point at a null appended after all the values
            index = np.concatenate(
                [np.where(i < 0, null_at, i + start) for (_, i), start in zip(pieces, starts, strict=False)]
            )  # (F'·B,) each row's position in values
            values = pa.concat_arrays([*(v for v, _ in pieces), pa.nulls(1, pa.string())])
            hashed = hash_strings(values, self.seed)[index].reshape(len(present), n).T  # (B, F')
            buckets = 1 + (hashed % np.uint64(self.buckets - 1)).astype(np.int64)
            null = values.is_null().to_numpy(zero_copy_only=False)[index]
            cat[:, present] = np.where(null.reshape(len(present), n).T, MISSING, buckets)

        x = np.full((n, len(self.dense)), np.nan)  # (B, D) raw values, NaN = null
        for j, name in enumerate(self.dense):
            if name in batch.schema.names:
                x[:, j] = _numpy(batch, name, np.float64)
        x = np.sign(x) * np.log1p(np.abs(x))
        present = np.isfinite(x)  # (B, D)
        if update_stats and n:
            self._update(x, present)
        count = np.array(self.count)
        std = np.sqrt(np.divide(self.m2, count, out=np.ones_like(count), where=count > 1))
        z = (x - np.array(self.mean)) / np.maximum(std, 1e-6)  # (B, D)
        dense = np.empty((n, self.n_dense_inputs), dtype=np.float32)  # (B, 2D): value, mask per feature
        dense[:, 0::2] = np.where(present, z, 0.0)
        dense[:, 1::2] = present
        return torch.from_numpy(cat), torch.from_numpy(dense)

    def merge_shards(self, start: dict, ends: list[dict]) -> None:
        """The dense stats after every rank's shard of one day: ``start`` (the stats every rank
        began from, ``state_dict()``) merged with what each rank's ``end`` state added to it."""
        total = _stats(start)
        for end in ends:
            total = _chan_merge(total, _chan_remove(_stats(end), _stats(start)))
        self.count, self.mean, self.m2 = (a.tolist() for a in total)

    def _update(self, x: np.ndarray, present: np.ndarray) -> None:
        """Chan et al.'s parallel Welford merge of a batch into the running stats, all features at once."""
        n_b = present.sum(axis=0).astype(np.float64)  # (D,)
        seen = n_b > 0
        mean_b = np.divide(np.where(present, x, 0.0).sum(axis=0), n_b, out=np.zeros_like(n_b), where=seen)
        m2_b = np.where(present, (x - mean_b) ** 2, 0.0).sum(axis=0)
        n_a, mean_a, m2_a = np.array(self.count), np.array(self.mean), np.array(self.m2)
        n = np.where(seen, n_a + n_b, 1.0)  # 1.0 only where nothing changes, to divide safely
        delta = mean_b - mean_a
        self.mean = np.where(seen, mean_a + delta * n_b / n, mean_a).tolist()
        self.m2 = np.where(seen, m2_a + m2_b + delta**2 * n_a * n_b / n, m2_a).tolist()
        self.count = (n_a + n_b).tolist()


def _numpy(batch: pa.RecordBatch | pa.Table, name: str, dtype) -> np.ndarray:
    """One column as a numpy array; nulls of a float column become NaN."""
    column = batch.column(name)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


@dataclass(frozen=True)
class Batch:
    categorical: torch.Tensor  # (B, F) long
    dense: torch.Tensor  # (B, 2D) float
    label: torch.Tensor  # (B,) float, or (B, T) with NaN where a request has no label of task t
    teacher: torch.Tensor | None  # (B,) teacher probability, when the rows carry one
    size: int


def _stats(state: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.array(state["count"], float), np.array(state["mean"], float), np.array(state["m2"], float)


def _chan_merge(a, b):
    """(count, mean, m2) of two disjoint sets of values from theirs (Chan et al.)."""
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
    n = n_a + n_b
    w = np.divide(n_b, n, out=np.zeros_like(n), where=n > 0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w, m2_a + m2_b + delta**2 * n_a * w


def _chan_remove(total, a):
    """(count, mean, m2) of ``total``'s values that are not ``a``'s: the inverse of ``_chan_merge``."""
    (n_t, mean_t, m2_t), (n_a, mean_a, m2_a) = total, a
    n_b = n_t - n_a
    mean_b = np.divide(n_t * mean_t - n_a * mean_a, n_b, out=np.zeros_like(n_b), where=n_b > 0)
    w = np.divide(n_a * n_b, n_t, out=np.zeros_like(n_t), where=n_t > 0)
    return n_b, mean_b, np.maximum(m2_t - m2_a - (mean_b - mean_a) ** 2 * w, 0.0)


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
    label: str | tuple[str, ...],
    batch_size: int,
    teacher: str | None = None,
    update_stats: bool = False,
    encode_rows: int = 16_384,
    background: bool = False,
) -> Iterator[Batch]:
    """Encoded training batches, in the order the record batches arrive.

    Rows are encoded ``encode_rows`` at a time (a whole number of batches) and the tensors then
    sliced, so the fixed cost of each Arrow and numpy call is paid once per chunk, not per batch;
    the dense statistics are updated once per chunk. ``label``: one column (labels (B,)) or
    several tasks' columns (labels (B, T), NaN where null). ``background`` reads and encodes the next
    chunk in a thread (``prefetch``) while the caller trains on this one.
    """
    rows = batch_size * max(1, encode_rows // batch_size)

    def chunks() -> Iterator[Batch]:
        for table in rebatch(batches, rows):
            cat, dense = encoder.encode(table, update_stats=update_stats)
            if isinstance(label, str):
                y = torch.from_numpy(_numpy(table, label, np.float32))  # (B,)
            else:
                y = torch.from_numpy(
                    np.stack([_numpy(table, c, np.float32) for c in label], axis=1)
                )  # (B, T)
            t = None if teacher is None else torch.from_numpy(_numpy(table, teacher, np.float32))
            yield Batch(cat, dense, y, t, table.num_rows)

    for chunk in prefetch(chunks()) if background else chunks():
        for i in range(0, chunk.size, batch_size):
            j = min(i + batch_size, chunk.size)
            t = None if chunk.teacher is None else chunk.teacher[i:j]
            yield Batch(chunk.categorical[i:j], chunk.dense[i:j], chunk.label[i:j], t, j - i)


def prefetch(items: Iterable) -> Iterator:
    """The items of ``items``, each computed by a background thread while the caller uses the previous one.

    Reading and encoding the next batch overlaps the training step on the current one (pyarrow,
    numpy and torch release the GIL). One item in flight, so memory holds two batches; an
    exception of the producer is raised here, in order.
    """
    from concurrent.futures import ThreadPoolExecutor

    end = object()
    source = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending = pool.submit(next, source, end)
        while (item := pending.result()) is not end:
            pending = pool.submit(next, source, end)
            yield item
