"""Training speed of the FM and of every VM backbone: the real job reading Delta next to the model alone.

    ./exfm python benchmarks/train_throughput.py --rows 1000000

Lands two synthetic days of ``--rows`` requests (generate, ingest, gates, FM dataset), trains
the FM on day 1, publishes it and scores day 2 with the DAS, and trains every VM (method
``ah_sa``) on day 1. Then, for day 2, each model is measured two ways in this one process:
(a) the same model (continued from its day-1 snapshot, same optimizer) stepping over the day's
batches already encoded in memory: the limit of the model and optimizer alone; (b) the real job
(``train_fm.run`` / ``train_vm.run``): the Delta day read by pyarrow, ids hashed, one pass,
snapshot written; (a) and (b) run in ``--repeats`` back-to-back pairs (see ``measure``). The
peak RSS of the process during a job must not grow with ``--rows``: training streams the day
(Spark's JVM is a separate process).
"""

import argparse
import datetime as dt
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import das, fm_dataset, generate, ingest, publishing, quality, snapshots, train_fm, train_vm  # noqa: E402
from jobs.config import load_config  # noqa: E402
from jobs.lakehouse import FM_DATASET, VM_TRAFFIC, VM_TRAINING  # noqa: E402
from jobs.spark import build_spark  # noqa: E402
from jobs.training import Progress, day_batches  # noqa: E402
from models.losses import DistillConfig  # noqa: E402


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux: clear_refs 5), to measure one job's peak."""
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200_000, help="requests per synthetic day")
    p.add_argument("--repeats", type=int, default=3, help="measurements of each; the medians are shown")
    p.add_argument("--set", action="append", default=[], help="config override key.path=value")
    p.add_argument("--root", help="work in (and keep) this directory; days it already holds are reused")
    args = p.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="exfm-throughput-"))
    cfg = load_config(
        overrides=[
            f"lakehouse_root={root}/lakehouse",
            f"landing_root={root}/landing",
            f"truth_root={root}/truth",
            f"synthetic.rows_per_day={args.rows}",
            *args.set,
        ]
    )
    spark = build_spark(cfg)
    day1, day2 = cfg.synthetic.start_date, cfg.synthetic.start_date + dt.timedelta(days=1)
    for day in (day1, day2):
        if Path(cfg.table(FM_DATASET), f"ds={day}").exists():
            continue  # landed by an earlier run in --root
        generate.run(day, cfg)
        ingest.run(day, cfg, spark)
        quality.run(VM_TRAFFIC, day, cfg, spark)
        fm_dataset.run(day, cfg, spark)
        quality.run(FM_DATASET, day, cfg, spark)
    train_fm.run(day1, cfg, spark)
    publishing.update_pointer(cfg, spark)
    das.run(day2, cfg, spark)
    quality.run(VM_TRAINING, day2, cfg, spark)
    for vm in cfg.vms:
        train_vm.run(day1, vm.name, cfg, spark, method="ah_sa")
    print(f"{args.rows:,} requests a day; peak RSS before the measured days: {peak_rss_mb():,.0f} MB")
    header = ("model", "rows", "in-memory rows/s", "Delta pass rows/s", "ratio")
    header += ("job s", "job rows/s", "peak RSS")
    print("{:18} {:>9} {:>17} {:>17} {:>6} {:>6} {:>10} {:>10}".format(*header))

    # FM: (a) in memory, then (b) the job, both continuing from the day-1 snapshot.
    model, optimizer, encoder, _ = train_fm.start(cfg, snapshots.fm_uri(cfg, day1))
    batches = list(
        day_batches(
            spark,
            cfg,
            FM_DATASET,
            day2,
            encoder,
            label=cfg.fm_labels,
            batch_size=cfg.fm.batch_size,
            update_stats=True,
            holdout="exclude",
        )
    )
    measure(
        f"fm ({cfg.fm.arch})",
        batches,
        lambda: train_fm.fit_day(model, optimizer, batches, Progress("in memory")),
        lambda: train_fm.run(day2, cfg, spark, publish=False),
        args.repeats,
    )

    for vm in cfg.vms:
        t = cfg.vm_training
        prev = snapshots.vm_uri(cfg, vm.name, "ah_sa", day1)
        model, optimizer, adapter, adapter_optimizer, encoder, _ = train_vm.start(
            cfg, vm, "ah_sa", prev, None
        )
        batches = list(
            day_batches(
                spark,
                cfg,
                VM_TRAINING,
                day2,
                encoder,
                label=vm.label,
                batch_size=t.batch_size,
                vm=vm.name,
                teacher=train_vm.TEACHER,
                update_stats=True,
            )
        )
        distill = DistillConfig(method="ah_sa", w=t.w, alpha=t.alpha)
        fit_args = (model, optimizer, distill, batches, Progress("in memory"), adapter, adapter_optimizer)
        measure(
            f"vm {vm.name} ({vm.model})",
            batches,
            lambda: train_vm.fit_day(*fit_args),  # noqa: B023 - called before the loop moves on
            lambda: train_vm.run(day2, vm.name, cfg, spark, method="ah_sa"),  # noqa: B023
            args.repeats,
        )


def measure(name: str, batches: list, in_memory, job, repeats: int) -> None:
    """Print one line: (a) ``in_memory()`` and (b) ``job()``, run in pairs ``repeats`` times.

    The machine's speed drifts by ±15% (a fixed matmul loop varies that much), so each ratio is
    taken within a pair run back to back and the medians are shown: rows/s of (a) and of the
    job's pass over the Delta day (``train_seconds``: read, encode, train), the median ratio, the
    whole job's seconds and rows/s (its Spark bookkeeping included: teacher lookup, snapshot,
    registry MERGE), and the peak RSS of one more job, run after the in-memory batches are freed
    (``batches.clear()``: the caller's list, so nothing else holds them).
    """
    rows = sum(b.size for b in batches)
    pairs = [(timed(in_memory)[1], timed(job)) for _ in range(repeats)]
    n = pairs[0][1][0]["n_examples"]
    mem = [rows / s for s, _ in pairs]
    passed = [n / out["train_seconds"] for _, (out, _) in pairs]
    job_s = statistics.median(s for _, (_, s) in pairs)
    batches.clear()
    reset_peak_rss()
    job()
    ratio = statistics.median(b / a for a, b in zip(mem, passed, strict=True))
    print(
        f"{name:18} {n:9,} {statistics.median(mem):17,.0f} {statistics.median(passed):17,.0f} {ratio:6.3f}"
        f" {job_s:6.1f} {n / job_s:10,.0f} {peak_rss_mb():7,.0f} MB",
        flush=True,
    )


if __name__ == "__main__":
    main()
