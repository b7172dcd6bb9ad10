"""Synthetic drifting traffic for N VMs, written in the landing contract (DESIGN.md §6).

The world is a function of (seed, day), not of earlier runs, so any day can be generated
alone (a backfill of day 5 needs no days 1..4) and a re-run writes identical files.

- Users and ads are integer ids whose attributes are hashes of (seed, id). The active users
  (ads) on day index t are the window [t*shift, t*shift + pool): each day ``churn_rate`` of
  them leave and as many new ones arrive.
- A request belongs to a home VM, which decides its base CTR (cross-domain bias) and its
  label; with probability ``shared_rate`` a second VM logs the same request_id with its own
  view of the features, like ranking stages that share traffic.
- Several tasks (paper Table 5): a VM's ``task`` (ctr, like, follow) says which truth its label
  is drawn from. Like and follow share part of the click's structure (correlated truths) and add
  terms of their own; a VM of a task is home to requests at its configured base rate.
- The hidden ground truth mixes id biases, a latent user x ad affinity, a drifting
  segment x category table, a 3-way segment x category x device cross (a second-order FM
  cannot represent it, a deep cross network can), a nonlinear dense cross and VM-only signals.
- Rows are made and written in chunks of ``rows_per_file`` requests, so memory stays flat
  whatever the day's size.
"""

from __future__ import annotations

import datetime as dt
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.config import ExfmConfig, parse_ds

# The features this generator knows how to make. A VM may declare any subset.
FEATURE_KINDS = {
    "user_segment": "categorical",
    "ad_category": "categorical",
    "advertiser_id": "categorical",
    "device": "categorical",
    "hour_bucket": "categorical",
    "query_category": "categorical",
    "user_activity": "dense",
    "ad_quality": "dense",
    "position": "dense",
    "watch_time": "dense",
}
N_SEGMENTS, N_CATEGORIES, N_ADVERTISERS, N_QUERY = 16, 24, 300, 8
DEVICES = np.array(["ios", "android", "web"])
LATENT_DIM = 4
DEFAULT_BASE_CTR = 0.03
# Per task: the label column of the truth, its share of the click's structure (the correlation
# of the truths), and its base rate on requests homed in a VM of another task.
TASKS = {
    "ctr": ("click", 1.0, DEFAULT_BASE_CTR),
    "like": ("like", 0.6, 0.02),
    "follow": ("follow", 0.4, 0.005),
}
CALIBRATION_ROWS = 60_000  # sample that sets each day's intercepts


# --- deterministic hashing of ids into attributes ---------------------------------------
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a fast, well-spread hash of uint64 arrays (wraps on purpose)."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uniform(seed: int, salt: int, ids: np.ndarray) -> np.ndarray:
    key = _mix(np.uint64((seed * 1_000_003 + salt) % 2**64))
    return (_mix(ids.astype(np.uint64) ^ key) >> np.uint64(11)).astype(np.float64) / 2.0**53


def _normal(seed: int, salt: int, ids: np.ndarray) -> np.ndarray:
    u1 = np.maximum(_uniform(seed, salt, ids), 1e-12)
    u2 = _uniform(seed, salt + 7919, ids)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@dataclass(frozen=True)
class GroundTruth:
    """The hidden click model of one day (index t since synthetic.start_date).

    Every table but the advertiser effect drifts by a seeded mean-reverting AR(1) walk, so
    day t is a function of (seed, t) alone and a model frozen on an old day gets worse every
    day, while each table's mean and spread, and so the click rate, stay where they started.
    """

    segment: np.ndarray  # (N_SEGMENTS,) main effect of the user segment
    category: np.ndarray  # (N_CATEGORIES,) main effect of the ad category
    advertiser: np.ndarray  # (N_ADVERTISERS,) static
    seg_cat: np.ndarray  # (N_SEGMENTS, N_CATEGORIES) pairwise cross
    seg_cat_dev: np.ndarray  # (4, 6, 3) three-way cross, drifts at half speed
    hour_phase: np.ndarray  # (N_CATEGORIES,) phase of each category's daily cycle

    # name -> (shape, spread, speed of its drift relative to synthetic.drift)
    TABLES = {
        "segment": (N_SEGMENTS, 0.4, 1.0),
        "category": (N_CATEGORIES, 0.5, 1.0),
        "advertiser": (N_ADVERTISERS, 0.3, 0.0),
        "seg_cat": ((N_SEGMENTS, N_CATEGORIES), 0.5, 1.0),
        "seg_cat_dev": ((4, 6, 3), 0.6, 0.5),
    }

    @classmethod
    def for_day(cls, seed: int, t: int, drift: float) -> GroundTruth:
        rng = np.random.default_rng([seed, 1])
        tables = {name: rng.normal(0, spread, shape) for name, (shape, spread, _) in cls.TABLES.items()}
        means = {name: table.mean() for name, table in tables.items()}
        for day in range(1, t + 1):  # day t takes t seeded steps
            step = np.random.default_rng([seed, 2, day])
            for name, table in tables.items():
                noise = step.normal(0, 1, table.shape)
                _, spread, speed = cls.TABLES[name]
                # AR(1) with innovation std `drift * speed` and stationary std `spread`: a
                # random walk's variance grows with t and pushes the click rate up every day.
                # Centred noise keeps each table's mean fixed.
                sigma = min(drift * speed, spread)
                keep = np.sqrt(1 - (sigma / spread) ** 2)
                tables[name] = means[name] + keep * (table - means[name]) + sigma * (noise - noise.mean())
        return cls(**tables, hour_phase=rng.uniform(0, 2 * np.pi, N_CATEGORIES))


def _day_index(cfg: ExfmConfig, day: dt.date) -> int:
    t = (day - cfg.synthetic.start_date).days
    if t < 0:
        raise ValueError(f"ds {day} is before synthetic.start_date {cfg.synthetic.start_date}")
    return t


def _active_ids(pool: int, churn: float, t: int, u: np.ndarray) -> np.ndarray:
    """Ids from day t's window of the pool; the window slides by churn*pool per day."""
    shift = int(round(churn * pool))
    return t * shift + np.minimum((u * pool).astype(np.int64), pool - 1)


def _chunk(
    cfg: ExfmConfig,
    day: dt.date,
    t: int,
    truth: GroundTruth,
    chunk: int,
    n: int,
    first_seq: int,
    intercept: dict[str, np.ndarray],
    stream: int = 3,
) -> dict[str, np.ndarray]:
    """All attributes, the true probability and the label of n requests, of every task in use.

    ``intercept``: per task, the logit offset of each home VM; ``stream`` picks an independent
    random stream (the calibration sample of ``_intercepts`` does not reuse the day's requests).
    """
    s, seed = cfg.synthetic, cfg.seeds.synthetic
    rng = np.random.default_rng([seed, stream, t, chunk])
    n_vms = len(cfg.vms)

    # Arrival times: chunk k covers the k-th slice of the day, sorted, so files arrive in order.
    n_chunks = -(-s.rows_per_day // s.rows_per_file)
    lo, hi = 86_400 * chunk / n_chunks, 86_400 * (chunk + 1) / n_chunks
    seconds = np.sort(rng.uniform(lo, hi, n))
    hour = (seconds // 3600).astype(np.int64)

    user = _active_ids(s.users, s.churn_rate, t, rng.random(n))
    ad = _active_ids(s.ads, s.churn_rate, t, rng.random(n))
    segment = (_uniform(seed, 10, user) * N_SEGMENTS).astype(np.int64)
    activity = np.exp(0.5 * _normal(seed, 11, user))
    category = (_uniform(seed, 20, ad) * N_CATEGORIES).astype(np.int64)
    advertiser = (_uniform(seed, 21, ad // 4) * N_ADVERTISERS).astype(np.int64)
    quality = _uniform(seed, 22, ad) ** 2
    device = rng.choice(3, n, p=[0.45, 0.45, 0.10])
    position = rng.integers(1, 6, n).astype(np.float64)
    query = np.where(rng.random(n) < 0.6, category % N_QUERY, rng.integers(0, N_QUERY, n))
    watch_time = activity * np.exp(0.3 * rng.normal(0, 1, n))
    affinity = sum(_normal(seed, 30 + k, user) * _normal(seed, 40 + k, ad) for k in range(LATENT_DIM)) * 0.35

    home = rng.integers(0, n_vms, n)
    logit = (
        0.3 * _normal(seed, 12, user)
        + 0.3 * _normal(seed, 23, ad)  # id biases
        + affinity
        + truth.segment[segment]
        + truth.category[category]
        + truth.advertiser[advertiser]
        + truth.seg_cat[segment, category]
        + truth.seg_cat_dev[segment % 4, category % 6, device]
        + 0.8 * (quality - 0.3) * np.tanh(activity - 1.0)
        + 0.3 * np.sin(2 * np.pi * hour / 24 + truth.hour_phase[category])
    )

    # Signals that only VMs declaring the feature see (their own view of the request).
    def declares(feature: str) -> np.ndarray:
        return np.array([feature in v.features for v in cfg.vms])[home]

    logit += declares("position") * -0.25 * (position - 1)
    logit += declares("query_category") * 0.7 * (query == category % N_QUERY)
    logit += declares("watch_time") * 0.3 * np.log(watch_time)
    structure = logit  # everything but the home VM's offset: what the tasks share
    logit = intercept["ctr"][home] + structure
    p_click = 1 / (1 + np.exp(-logit))
    click = (rng.random(n) < p_click).astype(np.int32)

    second = -np.ones(n, dtype=np.int64)
    if n_vms > 1:
        shared = rng.random(n) < s.shared_rate
        second[shared] = (home[shared] + rng.integers(1, n_vms, shared.sum())) % n_vms

    # Other tasks, drawn after the click's stream so that the click world does not change.
    own = {
        "like": 0.5 * _normal(seed, 50, user) + 0.4 * _normal(seed, 51, ad),  # taste of user and ad
        "follow": 0.7 * _normal(seed, 60, advertiser) + 0.4 * _normal(seed, 61, user),
    }
    tasks = {}
    for task in [t for t in TASKS if t != "ctr" and t in intercept]:
        name, share, _ = TASKS[task]
        task_logit = intercept[task][home] + share * structure + own[task]
        p = 1 / (1 + np.exp(-task_logit))
        tasks |= {f"logit_{name}": task_logit, f"p_{name}": p, name: (rng.random(n) < p).astype(np.int32)}

    start = np.datetime64(day.isoformat(), "us")
    return {
        "request_id": np.char.add(
            f"r{day:%Y%m%d}-", np.char.zfill((first_seq + np.arange(n)).astype(str), 9)
        ),
        "event_ts": start + (seconds * 1e6).astype("timedelta64[us]"),
        "user_id": np.char.add("u", user.astype(str)),
        "ad_id": np.char.add("a", ad.astype(str)),
        "user_segment": np.char.add("s", segment.astype(str)),
        "ad_category": np.char.add("c", category.astype(str)),
        "advertiser_id": np.char.add("adv", advertiser.astype(str)),
        "device": DEVICES[device],
        "hour_bucket": np.char.add("h", (hour // 4).astype(str)),
        "query_category": np.char.add("q", query.astype(str)),
        "user_activity": activity,
        "ad_quality": quality,
        "position": position,
        "watch_time": watch_time,
        "click": click,
        "p_click": p_click,
        "logit_click": logit,
        "home": home,
        "second": second,
        **tasks,
    }


def _intercepts(cfg: ExfmConfig, day: dt.date, t: int, truth: GroundTruth) -> dict[str, np.ndarray]:
    """Per task in use and home VM, the logit offset that puts the day's mean true rate of the
    task at the VM's synthetic.base_ctr (a VM of another task: the task's default rate).

    Solved on a fixed sample of the day's world, so the drifting structure never moves the
    base rates: every next-day calibration error is the model's, not the world's.
    """
    zero = {task: np.zeros(len(cfg.vms)) for task in TASKS if task == "ctr" or task in _tasks(cfg)}
    sample = _chunk(cfg, day, t, truth, 0, CALIBRATION_ROWS, 0, zero, stream=5)
    offsets = {}
    for task in zero:
        name, _, default = TASKS[task]
        offsets[task] = np.zeros(len(cfg.vms))
        for i, vm in enumerate(cfg.vms):
            logit = sample[f"logit_{name}"][sample["home"] == i]
            target = cfg.synthetic.base_ctr.get(vm.name, DEFAULT_BASE_CTR) if vm.task == task else default
            lo, hi = -30.0, 30.0
            for _ in range(60):  # bisection: the mean of sigmoid(logit + b) rises with b
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-(logit + mid)))) < target else (lo, mid)
            offsets[task][i] = (lo + hi) / 2
    return offsets


def _tasks(cfg: ExfmConfig) -> list[str]:
    """The tasks of the registry's VMs, in TASKS order."""
    return [task for task in TASKS if any(vm.task == task for vm in cfg.vms)]


def _vm_table(
    rows: dict[str, np.ndarray], vm_index: int, cfg: ExfmConfig, rng: np.random.Generator
) -> pa.Table:
    """One VM's view: its requests, its declared columns, a few duplicated log lines."""
    vm = cfg.vms[vm_index]
    idx = np.flatnonzero((rows["home"] == vm_index) | (rows["second"] == vm_index))
    dupes = idx[rng.random(idx.size) < cfg.synthetic.duplicate_rate]
    idx = np.sort(np.concatenate([idx, dupes]), kind="stable")
    cols = {c: rows[c][idx] for c in ("request_id", "event_ts", "user_id", "ad_id", *vm.features)}
    cols[vm.label] = rows[TASKS[vm.task][0]][idx]
    table = pa.table(cols)
    return table.set_column(1, "event_ts", table["event_ts"].cast(pa.timestamp("us", tz="UTC")))


def run(ds: str | dt.date, cfg: ExfmConfig) -> dict:
    """Write landing/ds=<ds>/vm=<name>/part-*.parquet and truth/ds=<ds>/part-*.parquet."""
    day = parse_ds(ds)
    unknown = {f for v in cfg.vms for f in v.features if f not in FEATURE_KINDS}
    wrong_kind = {f for v in cfg.vms for f in v.categorical if FEATURE_KINDS.get(f) == "dense"}
    wrong_kind |= {f for v in cfg.vms for f in v.dense if FEATURE_KINDS.get(f) == "categorical"}
    if unknown or wrong_kind:
        raise ValueError(
            f"the synthetic generator cannot make features {sorted(unknown)} and makes "
            f"{sorted(wrong_kind)} with another kind; it knows {FEATURE_KINDS}"
        )
    if "://" in cfg.landing_root or "://" in cfg.truth_root:
        raise ValueError("exfm generate writes local files only: landing_root/truth_root must be local")
    t = _day_index(cfg, day)
    s = cfg.synthetic
    truth = GroundTruth.for_day(cfg.seeds.synthetic, t, s.drift)
    intercept = _intercepts(cfg, day, t, truth)
    part = f"ds={day.isoformat()}"
    # Write into a private temp dir and swap it in, so readers never see half a day.
    landing_tmp = Path(cfg.landing) / f"_tmp_{part}_{uuid.uuid4().hex}"
    truth_tmp = Path(cfg.truth) / f"_tmp_{part}_{uuid.uuid4().hex}"
    counts = {v.name: 0 for v in cfg.vms}
    clicks = {v.name: 0 for v in cfg.vms}
    try:
        for chunk, first in enumerate(range(0, s.rows_per_day, s.rows_per_file)):
            n = min(s.rows_per_file, s.rows_per_day - first)
            rows = _chunk(cfg, day, t, truth, chunk, n, first, intercept)
            rng = np.random.default_rng([cfg.seeds.synthetic, 4, t, chunk])
            for i, vm in enumerate(cfg.vms):
                table = _vm_table(rows, i, cfg, rng)
                out = landing_tmp / f"vm={vm.name}"
                out.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, out / f"part-{chunk:05d}.parquet")
                counts[vm.name] += table.num_rows
                clicks[vm.name] += int(pc.sum(table[vm.label]).as_py() or 0)
            truth_tmp.mkdir(parents=True, exist_ok=True)
            pq.write_table(
                pa.table(
                    {
                        "request_id": rows["request_id"],
                        "home_vm": np.array([v.name for v in cfg.vms])[rows["home"]],
                        "p_click": rows["p_click"],
                        "click": rows["click"],
                        **{
                            f"p_{TASKS[task][0]}": rows[f"p_{TASKS[task][0]}"]
                            for task in _tasks(cfg)
                            if task != "ctr"
                        },
                    }
                ),
                truth_tmp / f"part-{chunk:05d}.parquet",
            )
        for tmp, root in ((landing_tmp, cfg.landing), (truth_tmp, cfg.truth)):
            final = Path(root) / part
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
    finally:
        for tmp in (landing_tmp, truth_tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "ds": day.isoformat(),
        "rows": counts,
        "ctr": {k: clicks[k] / counts[k] if counts[k] else float("nan") for k in counts},
    }
