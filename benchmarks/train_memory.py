"""Peak memory and speed of one FM training day, for a given day size.

    ./exfm python benchmarks/train_memory.py --rows 1000000

Generates one synthetic day into a temp dir, ingests it, builds the FM dataset, then trains
the FM one pass. Prints the Python process's peak RSS before and after training: training
streams Arrow batches, so the training step must not grow with the day's size. (Spark's JVM
is a separate process whose heap is capped by spark.driver_memory.)
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import fm_dataset, generate, ingest, quality, train_fm  # noqa: E402
from jobs.config import load_config  # noqa: E402
from jobs.lakehouse import FM_DATASET, VM_TRAFFIC  # noqa: E402
from jobs.spark import build_spark  # noqa: E402


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config(root: Path, rows: int):
    return load_config(
        overrides=[
            f"lakehouse_root={root}/lakehouse",
            f"landing_root={root}/landing",
            f"truth_root={root}/truth",
            f"synthetic.rows_per_day={rows}",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--train-in", help=argparse.SUPPRESS)  # internal: the training process
    args = p.parse_args()
    if args.train_in:  # a fresh process, so its peak RSS is the training's alone
        cfg = config(Path(args.train_in), args.rows)
        spark = build_spark(cfg)
        rss_spark = peak_rss_mb()
        t = time.perf_counter()
        result = train_fm.run(cfg.synthetic.start_date, cfg, spark)
        seconds = time.perf_counter() - t
        print(
            json.dumps(
                {
                    "train_rows": result["n_examples"],
                    "train_s": round(seconds, 1),
                    "train_rows_per_s": round(result["n_examples"] / seconds),
                    "fm_parameters": result["parameters"],
                    "rss_after_spark_start_mb": round(rss_spark),
                    "peak_rss_train_process_mb": round(peak_rss_mb()),
                }
            )
        )
        return
    root = Path(tempfile.mkdtemp(prefix="exfm-bench-"))
    cfg = config(root, args.rows)
    day = cfg.synthetic.start_date
    t = time.perf_counter()
    generate.run(day, cfg)
    print(
        json.dumps(
            {
                "rows_per_day": args.rows,
                "generate_s": round(time.perf_counter() - t, 1),
                "peak_rss_generate_mb": round(peak_rss_mb()),
            }
        )
    )
    spark = build_spark(cfg)
    t = time.perf_counter()
    ingest.run(day, cfg, spark)
    quality.run(VM_TRAFFIC, day, cfg, spark)
    fm = fm_dataset.run(day, cfg, spark)
    quality.run(FM_DATASET, day, cfg, spark)
    elapsed = round(time.perf_counter() - t, 1)
    print(json.dumps({"fm_rows": fm["rows"], "ingest_fm_dataset_and_gates_s": elapsed}))
    spark.stop()
    subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--train-in", str(root)], check=True)
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
