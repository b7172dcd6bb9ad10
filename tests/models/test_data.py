"""Feature encoding and re-batching (models/data.py): stable, seeded, streaming."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from models.data import HASHING, MISSING, FeatureEncoder, hash_strings, rebatch, stream_batches


def _table(n, seed=0):
    rng = np.random.default_rng(seed)
    users = [f"u{i}" for i in rng.integers(0, 50, n)]
    users[0] = None
    x = rng.lognormal(0, 1, n)
    x[1] = np.nan
    return pa.table({"user_id": users, "x": pa.array(x, from_pandas=True), "click": rng.integers(0, 2, n)})


def test_hashing_is_stable_seeded_and_handles_nulls_and_new_ids():
    enc = FeatureEncoder(categorical=("user_id", "nope"), dense=(), buckets=64, seed=3)
    cat, _ = enc.encode(_table(100), update_stats=False)
    again, _ = FeatureEncoder(categorical=("user_id", "nope"), dense=(), buckets=64, seed=3).encode(
        _table(100), update_stats=False
    )
    assert torch.equal(cat, again)  # a fresh process maps ids the same way
    other, _ = FeatureEncoder(categorical=("user_id", "nope"), dense=(), buckets=64, seed=4).encode(
        _table(100), update_stats=False
    )
    assert not torch.equal(cat, other)
    assert cat[0, 0] == MISSING and (cat[1:, 0] >= 1).all() and (cat[:, 0] < 64).all()
    assert (cat[:, 1] == MISSING).all()  # a column the rows do not have is missing, not an error
    new, _ = enc.encode(pa.table({"user_id": ["never-seen-before"]}), update_stats=False)
    assert 1 <= int(new[0, 0]) < 64


def _reference_hash(text: str, seed: int) -> int:
    """hash_strings' rule in plain Python integers, one value at a time."""
    m = 2**64

    def mix(x):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % m
        return x ^ (x >> 31)

    data, p = text.encode(), 0x100000001B3
    poly = sum(byte * pow(p, j, m) for j, byte in enumerate(data)) + len(data) * pow(p, len(data), m)
    return mix((poly + mix(seed)) % m)


def test_hash_strings_follows_its_rule_whatever_the_batch():
    values = ["", "a", "u123", "héllo", None, "x" * 300, "u124", "123"]
    hashed = hash_strings(pa.array(values), 5)
    assert [int(h) for v, h in zip(values, hashed, strict=True) if v is not None] == [
        _reference_hash(v, 5) for v in values if v is not None
    ]
    arr = pa.array(values)
    assert list(hash_strings(arr.slice(2, 3), 5)) == list(hashed[2:5])  # a slice of a batch
    chunked = pa.chunked_array([arr.slice(0, 3), arr.slice(3)])
    assert list(hash_strings(chunked, 5)) == list(hashed)
    assert hash_strings(pa.array([123]), 5)[0] == hashed[-1]  # an id logged as a number hashes as its text
    assert not (hash_strings(arr, 6) == hashed).all()  # seeded
    # The paths by value length: one length (request ids), a few, more than _LENGTH_GROUPS.
    for batch in (
        [f"r{i:08d}" for i in range(50)],
        [f"u{i}" for i in range(0, 5000, 37)],
        ["y" * n + "é" for n in range(40)],
    ):
        assert [int(h) for h in hash_strings(pa.array(batch), 5)] == [_reference_hash(v, 5) for v in batch]
    spread = np.unique(hash_strings(pa.array([f"u{i}" for i in range(20_000)]), 1) % 1000)
    assert len(spread) == 1000  # sequential ids fill every bucket


def test_dictionary_encoded_ids_get_the_buckets_of_their_text():
    """Parquet's dictionary pages read as they are (one dictionary per chunk, nulls in the indices
    or in the dictionary) map every row to the bucket its plain text gets."""
    plain = pa.table({"user_id": ["a", None, "b", "a", "c", None, "b", "zz"], "ad_id": list("pqpqpqpq")})
    chunks = [  # rows 0-3 (a null index), rows 4-7 (a null in the dictionary, an unused value)
        pa.DictionaryArray.from_arrays(pa.array([0, None, 1, 0], pa.int32()), pa.array(["a", "b"])),
        pa.DictionaryArray.from_arrays(
            pa.array([3, 1, 0, 4], pa.int32()), pa.array(["b", None, "x", "c", "zz"])
        ),
    ]
    encoded = pa.table({"user_id": pa.chunked_array(chunks), "ad_id": plain["ad_id"]})
    assert encoded["user_id"].to_pylist() == plain["user_id"].to_pylist()
    enc = FeatureEncoder(categorical=("user_id", "ad_id", "nope"), dense=(), buckets=1000, seed=7)
    expected, _ = enc.encode(plain, update_stats=False)
    got, _ = enc.encode(encoded, update_stats=False)
    assert torch.equal(got, expected)
    assert (got[[1, 5], 0] == MISSING).all() and (got[[0, 2, 3, 4, 6, 7], 0] != MISSING).all()


def test_snapshots_of_another_hashing_are_refused():
    state = FeatureEncoder(categorical=("user_id",), dense=()).state_dict()
    assert state["hashing"] == HASHING
    del state["hashing"]  # a snapshot from before: ids hashed with SipHash
    with pytest.raises(ValueError, match="--fresh"):
        FeatureEncoder.from_state(state)


def test_dense_stats_stream_to_the_whole_day_statistics_and_survive_a_snapshot():
    table = _table(1000)
    enc = FeatureEncoder(categorical=(), dense=("x",))
    for chunk in rebatch(table.to_batches(max_chunksize=70), 128):
        enc.encode(chunk, update_stats=True)
    x = table["x"].to_numpy(zero_copy_only=False)
    z = np.log1p(x[np.isfinite(x)])
    assert np.isclose(enc.mean[0], z.mean()) and np.isclose(enc.m2[0] / enc.count[0], z.var())

    restored = FeatureEncoder.from_state(enc.state_dict())
    _, a = enc.encode(table, update_stats=False)
    _, b = restored.encode(table, update_stats=False)
    assert torch.equal(a, b)
    assert a[1].tolist() == [0.0, 0.0]  # null -> value 0, mask 0
    assert abs(float(a[a[:, 1] == 1, 0].mean())) < 1e-5  # standardised


def test_ranks_dense_stats_merge_to_one_process_stats():
    """Each rank continues yesterday's stats over its shard of the day; merged, they are the stats of
    yesterday plus the whole day, as one process would have them."""
    yesterday, today = _table(400), _table(1000)
    one = FeatureEncoder(categorical=(), dense=("x",))
    one.encode(yesterday, update_stats=True)
    start = one.state_dict()
    ranks = [FeatureEncoder.from_state(start) for _ in range(3)]
    for i, chunk in enumerate(rebatch(today.to_batches(max_chunksize=100), 90)):
        ranks[i % 3].encode(chunk, update_stats=True)
    one.encode(today, update_stats=True)
    merged = FeatureEncoder.from_state(start)
    merged.merge_shards(start, [r.state_dict() for r in ranks])
    assert merged.count == one.count
    assert np.allclose(merged.mean, one.mean) and np.allclose(merged.m2, one.m2)


def test_rebatch_gives_fixed_sizes_in_order():
    table = pa.table({"i": np.arange(1000)})
    sizes, seen = [], []
    for t in rebatch(table.to_batches(max_chunksize=333), 128):
        sizes.append(t.num_rows)
        seen.extend(t["i"].to_pylist())
    assert sizes == [128] * 7 + [104] and seen == list(range(1000))


def test_stream_batches_carries_labels_and_teacher():
    table = _table(300).append_column("teacher_score", pa.array(np.full(300, 0.25)))
    enc = FeatureEncoder(categorical=("user_id",), dense=("x",))
    batches = list(
        stream_batches(table.to_batches(), enc, label="click", batch_size=100, teacher="teacher_score")
    )
    assert [b.size for b in batches] == [100, 100, 100]
    assert batches[0].categorical.shape == (100, 1) and batches[0].dense.shape == (100, 2)
    assert torch.equal(
        torch.cat([b.label for b in batches]), torch.tensor(table["click"].to_numpy(), dtype=torch.float32)
    )
    assert all(torch.allclose(b.teacher, torch.full((100,), 0.25)) for b in batches)
    # Encoded a chunk at a time, in a background thread or not: the same batches.
    for kwargs in ({"encode_rows": 100}, {"encode_rows": 200, "background": True}):
        again = list(
            stream_batches(table.to_batches(max_chunksize=70), enc, label="click", batch_size=100, **kwargs)
        )
        assert [b.size for b in again] == [100, 100, 100]
        assert all(torch.equal(a.categorical, b.categorical) for a, b in zip(batches, again, strict=True))
