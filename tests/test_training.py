"""FM and VM training on real Spark + Delta data: chain, resume determinism, snapshots, quality."""

import datetime as dt
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs import das, evaluate, lakehouse, quality, snapshots, train_fm, train_vm
from jobs.lakehouse import FM_DATASET, VM_SNAPSHOTS, VM_TRAINING, read_day, replace_partition
from jobs.training import Progress, day_batches, day_ctr
from tests.conftest import REPO, SHORT_LIVED, TINY, land_days, tiny_config

DAYS = [dt.date(2026, 1, 1) + dt.timedelta(days=i) for i in range(4)]
QUALITY = [
    "synthetic.rows_per_day=20000",
    "synthetic.rows_per_file=20000",
    "synthetic.users=2000",
    "synthetic.ads=400",
]
SEEDS = (11, 12, 13)


@pytest.fixture(scope="module")
def world(spark, tmp_path_factory):
    """4 synthetic days through ingest and the FM dataset; the FM trained on days 1-3, DAS on 2-3."""
    root = tmp_path_factory.mktemp("training")
    cfg = tiny_config(root, *QUALITY)
    land_days(DAYS, cfg, spark)
    for day in DAYS[:3]:
        train_fm.run(day, cfg, spark)
    for day in DAYS[1:3]:  # the DAS: FM(day - 1) scores day
        assert das.run(day, cfg, spark)["trained_through_ds"] == str(day - dt.timedelta(days=1))
        quality.run(VM_TRAINING, day, cfg, spark)
    return root, cfg


def test_fm_chain_needs_yesterday(spark, world):
    _, cfg = world
    meta = snapshots.load(snapshots.fm_uri(cfg, DAYS[1])).meta
    assert meta["continued_from"].endswith("ds=2026-01-01") and meta["trained_through_ds"] == "2026-01-02"
    with pytest.raises(ValueError, match="no snapshot trained through 2026-01-04"):
        train_fm.run(DAYS[0] + dt.timedelta(days=4), cfg, spark)  # day 5 after a gap


def test_snapshot_is_verified_by_sha256(world, tmp_path):
    _, cfg = world
    src = snapshots.fm_uri(cfg, DAYS[0])
    snap = snapshots.load(src)
    copy = tmp_path / "snap"
    snapshots.save(str(copy), snap.state, {k: v for k, v in snap.meta.items() if k not in ("sha256",)})
    model_file = next(copy.glob("model-*.pt"))
    payload = bytearray(model_file.read_bytes())
    payload[len(payload) // 2] ^= 0xFF  # one flipped byte
    model_file.write_bytes(bytes(payload))
    with pytest.raises(snapshots.SnapshotError, match="sha256"):
        snapshots.load(str(copy))


def test_resume_in_three_processes_equals_one_continuous_run(spark, world, tmp_path):
    root, cfg = world
    # One process, one model object trained through days 1..3 without any snapshot in between.
    prior = (day_ctr(spark, cfg, FM_DATASET, DAYS[0], "click"),)
    model, optimizer, encoder, _ = train_fm.start(cfg, None, prior)
    for day in DAYS[:3]:
        batches = day_batches(
            spark,
            cfg,
            FM_DATASET,
            day,
            encoder,
            label=cfg.fm_labels,
            batch_size=cfg.fm.batch_size,
            update_stats=True,
            holdout="exclude",
        )
        train_fm.fit_day(model, optimizer, batches, Progress("continuous"))

    # Three processes, each continuing from the previous day's snapshot.
    args = ["--config", str(REPO / "exfm.yaml")]
    for item in [
        *TINY,
        *QUALITY,
        *SHORT_LIVED,
        f"lakehouse_root={root / 'lakehouse'}",
        f"snapshots_root={tmp_path}",
    ]:
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for day in DAYS[:3]:
        subprocess.run(
            [sys.executable, "-m", "jobs.cli", "train-fm", "--ds", str(day), *args],
            check=True,
            env=env,
            capture_output=True,
        )
    separate = snapshots.load(f"{tmp_path}/fm/ds=2026-01-03").state["model"]
    in_process = snapshots.load(snapshots.fm_uri(cfg, DAYS[2])).state["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, separate[name]), name
        assert torch.equal(value, in_process[name]), name


def _next_day(spark, cfg, snapshot_uri, vm, base_rate):
    return evaluate.score_snapshots([snapshot_uri], DAYS[3], vm, cfg, spark, base_rate=base_rate)[0]


def test_fm_beats_every_vm_ah_beats_none_and_all_are_calibrated(spark, world):
    """Quality on synthetic data (not a timing): next-day NE and calibration on day 4.

    The VMs are trained on days 2-3, the FM on days 1-3. NE of every model is normalised by the
    same base rate (the VM's training CTR), so NEs of one VM's rows compare like LogLoss.
    """
    root, cfg = world
    fm_uri = snapshots.fm_uri(cfg, DAYS[2])
    fm_params = snapshots.load(fm_uri).meta["parameters"]
    ne, calibration = {}, {}
    for seed in SEEDS:
        seeded = tiny_config(root, *QUALITY, f"seeds.train={seed}", f"snapshots_root={root / f'seed{seed}'}")
        for vm in cfg.vms:
            for method in ("none", "ah") if vm.name == "feed" else ("none",):
                for day in DAYS[1:3]:
                    out = train_vm.run(day, vm.name, seeded, spark, method=method)
                    assert out["parameters"] < fm_params  # the teacher is the larger model
                uri = snapshots.vm_uri(seeded, vm.name, method, DAYS[2])
                base = snapshots.load(uri).meta["train_ctr"]
                m = _next_day(spark, seeded, uri, vm.name, base)
                ne[(seed, vm.name, method)], calibration[(seed, vm.name, method)] = m["ne"], m["calibration"]
                if method == "none":
                    ne[(seed, vm.name, "fm")] = _next_day(spark, cfg, fm_uri, vm.name, base)["ne"]

    for vm in cfg.vms:
        fm = np.mean([ne[(s, vm.name, "fm")] for s in SEEDS])
        none = np.mean([ne[(s, vm.name, "none")] for s in SEEDS])
        assert fm < none, (vm.name, fm, none, ne)
        # Predicted clicks / clicks of the next day: one-pass training must not drift off the rate.
        assert 0.9 <= np.mean([calibration[(s, vm.name, "none")] for s in SEEDS]) <= 1.1, calibration
    # The FM on the next day of its own data (the merged view it trains on).
    assert 0.9 <= _next_day(spark, cfg, fm_uri, None, None)["calibration"] <= 1.1
    none = np.array([ne[(s, "feed", "none")] for s in SEEDS])
    ah = np.array([ne[(s, "feed", "ah")] for s in SEEDS])
    # Same seed = same initial weights for both methods: compare pairs, then the mean gain
    # against the noise of the pairs' gains.
    gain = none - ah
    assert (gain > 0).all(), (none, ah)
    assert gain.mean() > gain.std(), (none, ah)


def test_none_ignores_teacher_scores(spark, world, tmp_path):
    """Replacing every teacher score changes nothing for `none` (and everything for `ah`)."""
    root, cfg = world
    other = tiny_config(tmp_path, *QUALITY)
    shutil.copytree(cfg.table(VM_TRAINING), other.table(VM_TRAINING))
    day = DAYS[1]
    rows = read_day(spark, cfg, VM_TRAINING, day).where("vm = 'feed'").toPandas()
    rows["teacher_score"] = np.random.default_rng(0).uniform(0.01, 0.99, len(rows))
    replace_partition(spark.createDataFrame(rows), other, VM_TRAINING, ["ds", "vm"], ds=day, vm="feed")

    sha = {}
    for name, c in (
        ("original", tiny_config(root, *QUALITY, f"snapshots_root={tmp_path / 'a'}")),
        ("replaced", other),
    ):
        for method in ("none", "ah"):
            sha[(name, method)] = train_vm.run(day, "feed", c, spark, method=method, fresh=True)["sha256"]
    assert sha[("original", "none")] == sha[("replaced", "none")]
    assert sha[("original", "ah")] != sha[("replaced", "ah")]


def _batches(spark, cfg, **kw):
    encoder = train_fm.new_encoder(cfg)
    return list(day_batches(spark, cfg, FM_DATASET, DAYS[0], encoder, label="click", batch_size=500, **kw))


def test_same_rows_give_the_same_batches_and_metrics_whatever_the_file_layout(spark, world, tmp_path):
    from pyspark.sql import functions as F

    _, cfg = world
    scattered = tiny_config(tmp_path, *QUALITY)
    # A layout none of the writers makes: the day's rows in random order over three files.
    rows = read_day(spark, cfg, FM_DATASET, DAYS[0]).repartition(3).sortWithinPartitions(F.rand(1))
    rows.write.format("delta").partitionBy("ds").save(scattered.table(FM_DATASET))

    def direct(c):  # the files as pyarrow would read them, or None when Spark has to sort first
        return lakehouse._direct_files(spark, c, FM_DATASET, read_day(spark, c, FM_DATASET, DAYS[0]), True)

    assert direct(cfg) is not None and direct(scattered) is None
    # The writers' layout is read from the files, ids as Parquet's dictionaries; the other through Spark.
    for c, kind in ((cfg, pa.types.is_dictionary), (scattered, pa.types.is_string)):
        with lakehouse.arrow_day(spark, c, FM_DATASET, DAYS[0], ["user_id"], dictionary=("user_id",)) as (
            _,
            rbs,
        ):
            assert kind(next(iter(rbs)).schema.field("user_id").type)
    for kw in ({"update_stats": True, "holdout": "exclude"}, {"holdout": "only"}):
        ours, theirs = _batches(spark, cfg, **kw), _batches(spark, scattered, **kw)
        assert [b.size for b in ours] == [b.size for b in theirs]
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a.categorical, b.categorical) and torch.equal(a.dense, b.dense)
            assert torch.equal(a.label, b.label)
    # The evaluation too: a model's metrics on the same rows, to the last bit, whatever the layout.
    fm = [snapshots.fm_uri(cfg, DAYS[0])]
    assert evaluate.score_snapshots(fm, DAYS[0], None, cfg, spark) == evaluate.score_snapshots(
        fm, DAYS[0], None, scattered, spark
    )
    held_out = sum(b.size for b in _batches(spark, cfg, holdout="only"))
    total = read_day(spark, cfg, FM_DATASET, DAYS[0]).count()
    assert 0.1 * total < held_out < 0.3 * total  # das.blessing.holdout_fraction=0.2 of TINY


def test_a_continued_day_uses_todays_hyper_parameters_and_refuses_a_new_architecture(spark, world, tmp_path):
    root, cfg = world
    base = [*QUALITY, f"snapshots_root={tmp_path}"]
    train_vm.run(DAYS[1], "feed", tiny_config(root, *base), spark, method="ah", fresh=True)
    today = tiny_config(
        root, *base, "vm_training.lr=0.0005", "vm_training.embedding_lr=0.2", "vm_training.beta=2.5"
    )
    prev = snapshots.vm_uri(today, "feed", "ah", DAYS[1])
    model, optimizer, *_ = train_vm.start(today, today.vm("feed"), "ah", prev, None)
    assert [g["lr"] for g in optimizer.dense.param_groups] == [0.0005]
    assert [g["lr"] for g in optimizer.embedding.param_groups] == [0.2]
    # The GS op in the forward pass: the aux head's gradient reaches the backbone output x 2.5 times.
    x = torch.randn(3, model.out_dim, requires_grad=True)
    model.backbone = lambda categorical, dense: x
    model(torch.zeros(3, 0), torch.zeros(3, 0))["aux_logit"].sum().backward()
    plain = x.detach().clone().requires_grad_()
    model.aux_head(plain).sum().backward()
    torch.testing.assert_close(x.grad, 2.5 * plain.grad)

    train_vm.run(DAYS[2], "feed", today, spark, method="ah")
    row = (
        spark.read.format("delta")
        .load(today.table(VM_SNAPSHOTS))
        .where(f"vm = 'feed' AND method = 'ah' AND ds = '{DAYS[2]}'")
    )
    hyper = json.loads(row.first()["hyper_parameters"])
    assert (hyper["lr"], hyper["embedding_lr"], hyper["beta"]) == (0.0005, 0.2, 2.5)
    assert snapshots.load(snapshots.vm_uri(today, "feed", "ah", DAYS[2])).meta["model_config"]["beta"] == 2.5

    wider = tiny_config(root, *base, "vm_training.embed_dim=16")
    with pytest.raises(ValueError, match=r"embed_dim is 16 in the config but 8 in the snapshot.*--fresh"):
        train_vm.run(DAYS[2], "feed", wider, spark, method="ah")


def test_evaluation_in_one_pass_equals_each_model_alone(spark, world, tmp_path):
    root, cfg = world
    other = tiny_config(root, *QUALITY, f"snapshots_root={tmp_path}")
    train_vm.run(DAYS[1], "search", other, spark, method="none", fresh=True)
    uris = [
        snapshots.vm_uri(other, "search", "none", DAYS[1]),
        snapshots.fm_uri(cfg, DAYS[1]),
        snapshots.fm_uri(cfg, DAYS[0]),
    ]
    together = evaluate.score_snapshots(uris, DAYS[2], "search", cfg, spark)
    alone = [evaluate.score_snapshots([uri], DAYS[2], "search", cfg, spark)[0] for uri in uris]
    assert together == alone
    assert len({m["ne"] for m in together}) == 3  # three different models, not one scored thrice


def test_fm_on_two_processes_trains_like_one_and_its_snapshot_resumes(spark, world, tmp_path):
    """fm.num_processes=2 (TorchDistributor, gloo): days 1-2, day 2 continuing from the 2-process
    snapshot of day 1; next-day NE of the FM of day 2 next to the one-process chain's."""
    root, cfg = world
    two = tiny_config(root, *QUALITY, "fm.num_processes=2", f"snapshots_root={tmp_path}")
    for day in DAYS[:2]:
        out = train_fm.run(day, two, spark, publish=False)
        assert out["n_examples"] == snapshots.load(snapshots.fm_uri(cfg, day)).meta["n_examples"]
    meta = snapshots.load(snapshots.fm_uri(two, DAYS[1])).meta
    assert meta["num_processes"] == 2 and meta["continued_from"] == snapshots.fm_uri(two, DAYS[0])
    ne = {
        name: evaluate.score_snapshots([snapshots.fm_uri(c, DAYS[1])], DAYS[2], None, c, spark)[0]
        for name, c in (("one", cfg), ("two", two))
    }
    # Same rows per step, same initial weights: only float summation order and the ranks' running
    # dense statistics differ.
    assert abs(ne["two"]["ne"] - ne["one"]["ne"]) < 0.005, ne
    assert abs(ne["two"]["calibration"] - ne["one"]["calibration"]) < 0.02, ne


def test_a_killed_rank_fails_the_fm_day_and_leaves_no_snapshot(world, tmp_path):
    root, _ = world
    marker = f"EXFM_TEST_RUN={os.getpid()}-{tmp_path.name}"
    args = ["--config", str(REPO / "exfm.yaml"), "--ds", str(DAYS[0])]
    for item in [*TINY, *QUALITY, f"lakehouse_root={root / 'lakehouse'}", f"snapshots_root={tmp_path}"]:
        args += ["--set", item]
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "train-fm", *args, "--set", "fm.num_processes=2"],
        env={**os.environ, "PYTHONPATH": str(REPO), marker.split("=")[0]: marker.split("=")[1]},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = None
    while killed is None and job.poll() is None:  # rank 1 as soon as it exists
        for proc in os.listdir("/proc"):
            try:
                environ = open(f"/proc/{proc}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if marker.encode() in environ and b"RANK=1" in environ:
                os.kill(int(proc), 9)
                killed = int(proc)
                break
    _, err = job.communicate(timeout=600)
    assert killed is not None, "rank 1 was never seen"
    assert job.returncode != 0, err[-3000:]
    assert snapshots.trained_days(f"{tmp_path}/fm") == []  # no committed snapshot (meta.json) of the day
