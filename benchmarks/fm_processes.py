"""FM rows/s with fm.num_processes = 1 and 2 on day 2 of a train_throughput.py --root (both fresh).

    ./exfm python benchmarks/fm_processes.py --root /tmp/exp/bench --rows 1000000

Each count runs twice, alternating; the second pair is the warm one. ``job``: train_fm.run
end to end (for 2: TorchDistributor's launch included); ``pass``: rank 0's read + train.
"""

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import train_fm  # noqa: E402
from jobs.config import load_config  # noqa: E402
from jobs.spark import build_spark  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True, help="a directory train_throughput.py --root filled")
    p.add_argument("--rows", type=int, default=1_000_000, help="its --rows")
    args = p.parse_args()
    base = [
        f"lakehouse_root={args.root}/lakehouse",
        f"landing_root={args.root}/landing",
        f"truth_root={args.root}/truth",
        f"synthetic.rows_per_day={args.rows}",
    ]
    spark = build_spark(load_config(overrides=base))
    day = load_config(overrides=base).synthetic.start_date + dt.timedelta(days=1)
    for n in (1, 2, 1, 2):
        cfg = load_config(overrides=[*base, f"fm.num_processes={n}", f"snapshots_root={args.root}/fm{n}"])
        t = time.perf_counter()
        out = train_fm.run(day, cfg, spark, fresh=True, publish=False)
        s, rows = time.perf_counter() - t, out["n_examples"]
        print(
            f"processes={n} rows={rows:,} job {s:.1f} s = {rows / s:,.0f} rows/s; "
            f"pass {out['train_seconds']:.1f} s = {rows / out['train_seconds']:,.0f} rows/s",
            flush=True,
        )


if __name__ == "__main__":
    main()
