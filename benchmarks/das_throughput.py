"""DAS throughput: teacher scores through Spark next to bare torch inference on the same rows.

    ./exfm python benchmarks/das_throughput.py [--rows 1000000]

Day 1 (20k rows) trains and publishes the FM; day 2 (--rows per day) is scored by the DAS
(``das-score``: resolve, merge the VMs' views, score in Spark workers, MERGE into
vm_training). The same requests are then scored in this process with plain torch, batches
of das.batch_size, after reading them (untimed) through Spark.
"""

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import das, fm_dataset, generate, ingest, publishing, quality, snapshots, train_fm  # noqa: E402
from jobs.config import load_config  # noqa: E402
from jobs.lakehouse import FM_DATASET, VM_TRAFFIC, VM_TRAINING, arrow_day  # noqa: E402
from jobs.spark import build_spark  # noqa: E402


def main() -> None:
    import torch

    from models.data import FeatureEncoder, rebatch

    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=20_000, help="requests per VM-day of the scored day")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="exfm-das-"))
    base = [f"lakehouse_root={root}/lakehouse", f"landing_root={root}/landing", f"truth_root={root}/truth"]
    small = load_config(overrides=[*base, "synthetic.rows_per_day=20000"])
    # Day 2 is deliberately much bigger than day 1: widen the gate's row-count band for it.
    cfg = load_config(
        overrides=[*base, f"synthetic.rows_per_day={args.rows}", "quality.row_count_factor=1e9"]
    )
    spark = build_spark(cfg)
    day1 = cfg.synthetic.start_date
    day2 = day1 + dt.timedelta(days=1)
    for day, c in ((day1, small), (day2, cfg)):
        generate.run(day, c)
        ingest.run(day, c, spark)
        quality.run(VM_TRAFFIC, day, c, spark)
        fm_dataset.run(day, c, spark)
        quality.run(FM_DATASET, day, c, spark)
    train_fm.run(day1, cfg, spark)

    t = time.perf_counter()
    out = das.run(day2, cfg, spark)
    total = time.perf_counter() - t
    quality.run(VM_TRAINING, day2, cfg, spark)  # untimed: the gate publishes the scores
    vm_rows = sum(out["rows"].values())
    print(
        f"DAS (Spark {cfg.spark.master}) ds={day2}: {vm_rows:,} VM rows, "
        f"{out['requests_scored']:,} requests, "
        f"{out['model_loads']} model loads, {out['score_batches']} batches"
    )
    print(
        f"  das-score end to end (resolve, merge views, score, stage): {total:.1f} s"
        f" = {vm_rows / total:,.0f} VM rows/s"
    )
    print(f"  scoring stage: {out['scoring_rows_per_s']:,} requests/s")

    row = publishing.resolve_for_day(day2, cfg, spark)
    snap = snapshots.load(row.uri)
    model = train_fm.build_model(snap.meta["model_config"])
    model.load_state_dict(snap.state["model"])
    model.eval()
    encoder = FeatureEncoder.from_state(snap.meta["encoder"])
    with arrow_day(spark, cfg, FM_DATASET, day2, ["request_id", *encoder.columns]) as (_, day_rows):
        batches = list(rebatch(day_rows, cfg.das.batch_size))
    n = sum(b.num_rows for b in batches)
    with torch.no_grad():
        t = time.perf_counter()
        encoded = [encoder.encode(b, update_stats=False) for b in batches]
        t_encode = time.perf_counter() - t
        t = time.perf_counter()
        for cat, dense in encoded:
            torch.sigmoid(model(cat, dense)["logit"])
        t_forward = time.perf_counter() - t
    print(
        f"bare torch ({torch.get_num_threads()} threads), same {n:,} requests: "
        f"encode+forward {n / (t_encode + t_forward):,.0f} requests/s, forward only {n / t_forward:,.0f}/s"
    )


if __name__ == "__main__":
    main()
