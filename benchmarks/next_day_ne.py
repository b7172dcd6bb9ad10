"""Next-day NE of the FM and of every VM method on the default synthetic data.

    ./exfm python benchmarks/next_day_ne.py [--days 4] [--seeds 11,12,13]

Days 1..N-1 train the FM; VMs train on days 2..N-1 with teacher scores of FM(day-1), with each
seed; all models are judged on day N with NE normalised by the VM's training CTR, so the rows
of one VM compare like LogLoss. Also prints parameter counts and training rows/s.
"""

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import das, evaluate, fm_dataset, generate, ingest, quality, snapshots, train_fm, train_vm  # noqa: E402
from jobs.config import load_config  # noqa: E402
from jobs.lakehouse import FM_DATASET, VM_TRAFFIC, VM_TRAINING  # noqa: E402
from jobs.spark import build_spark  # noqa: E402

METHODS = ("none", "kd", "ah", "ah_sa")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--days", type=int, default=4)
    p.add_argument("--seeds", default="11,12,13")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(tempfile.mkdtemp(prefix="exfm-ne-"))
    base = [f"lakehouse_root={root}/lakehouse", f"landing_root={root}/landing", f"truth_root={root}/truth"]
    cfg = load_config(overrides=base)
    spark = build_spark(cfg)
    days = [cfg.synthetic.start_date + dt.timedelta(days=i) for i in range(args.days)]
    for day in days:
        generate.run(day, cfg)
        ingest.run(day, cfg, spark)
        quality.run(VM_TRAFFIC, day, cfg, spark)
        fm_dataset.run(day, cfg, spark)
        quality.run(FM_DATASET, day, cfg, spark)
    fm_rate = []
    for day in days[:-1]:
        t = time.perf_counter()
        out = train_fm.run(day, cfg, spark)
        fm_rate.append(out["n_examples"] / (time.perf_counter() - t))
    for day in days[1:-1]:
        das.run(day, cfg, spark)
        quality.run(VM_TRAINING, day, cfg, spark)
    fm_uri = snapshots.fm_uri(cfg, days[-2])
    print(
        f"FM {cfg.fm.arch}: {out['parameters']:,} parameters, {np.mean(fm_rate):,.0f} rows/s (with Spark I/O)"
    )

    for vm in cfg.vms:
        ne = {m: [] for m in ("fm", *METHODS)}
        other = {}
        for seed in seeds:
            seeded = load_config(
                overrides=[*base, f"seeds.train={seed}", f"snapshots_root={root}/seed{seed}"]
            )
            for method in METHODS:
                t, rows = time.perf_counter(), 0
                for day in days[1:-1]:
                    res = train_vm.run(day, vm.name, seeded, spark, method=method)
                    rows += res["n_examples"]
                rate = rows / (time.perf_counter() - t)
                uri = snapshots.vm_uri(seeded, vm.name, method, days[-2])
                ctr = snapshots.load(uri).meta["train_ctr"]
                m = evaluate.score_snapshots([uri], days[-1], vm.name, seeded, spark, base_rate=ctr)[0]
                ne[method].append(m["ne"])
                other.setdefault(method, []).append((m["auc"], m["calibration"], rate, res["parameters"]))
                if method == "none":
                    f = evaluate.score_snapshots([fm_uri], days[-1], vm.name, cfg, spark, base_rate=ctr)[0]
                    ne["fm"].append(f["ne"])
                    other.setdefault("fm", []).append(
                        (f["auc"], f["calibration"], float("nan"), out["parameters"])
                    )
        print(f"\nVM {vm.name} ({vm.model}), next-day NE on {days[-1]} over seeds {seeds}:")
        print(
            f"  {'model':8} {'NE mean':>8} {'± std':>7} {'gain vs none':>13} {'AUC':>6} {'calib':>6} "
            f"{'rows/s':>8} {'params':>10}"
        )
        none = np.mean(ne["none"])
        for name, values in ne.items():
            auc, calib, rate, params = np.mean([o[:3] for o in other[name]], axis=0).tolist() + [
                other[name][0][3]
            ]
            gain = 100 * (none - np.mean(values)) / none
            print(
                f"  {name:8} {np.mean(values):8.4f} {np.std(values):7.4f} {gain:12.2f}% "
                f"{auc:6.3f} {calib:6.3f} {rate:8.0f} {params:10,}"
            )


if __name__ == "__main__":
    main()
