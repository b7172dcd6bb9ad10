"""A gate's seconds as the GX project fills with validation results: the Data Docs index.

    ./exfm python benchmarks/data_docs_index.py [--results 0 30 90 360] [--set quality.docs_index_results=N]

Lands two tiny days, then before each measurement fills the GX project's validations store up
to ``--results`` stored results (copies of the day's real `vm_traffic` result under the run names
of earlier days, as months of gates leave them: four gated tables a day, kept
``maintenance.data_docs_days``), and times one real gate (`vm_traffic` of day 2, validated
again) in a warm driver: its wall seconds and this process's CPU seconds (GX renders the Data
Docs in Python). Run it once per setting, with nothing else running.
"""

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import land_days, tiny_config  # noqa: E402

DAYS = ["2026-01-01", "2026-01-02"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=int, nargs="+", default=[0, 30, 90, 360])
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()

    from jobs import quality
    from jobs.lakehouse import VM_TRAFFIC
    from jobs.spark import build_spark

    cfg = tiny_config(Path(tempfile.mkdtemp(prefix="exfm-docs-index-")), *args.overrides)
    spark = build_spark(cfg)
    land_days(DAYS, cfg, spark)
    quality.run(VM_TRAFFIC, DAYS[1], cfg, spark)  # warm: the same gate once before any timing
    # A run is its result in the GX project and its page in the site (the index lists the pages).
    stores = [Path(cfg.gx_root, "gx", "uncommitted", "validations"), Path(cfg.docs_root, "validations")]
    real = next(Path(stores[0], "vm_traffic", f"{VM_TRAFFIC}-{DAYS[1]}").iterdir()).name  # run time
    out = {"overrides": args.overrides, "gates": []}
    stored, day = len(list(stores[1].glob("*/*/*"))), dt.date.fromisoformat(DAYS[0])
    for target in args.results:
        while stored < target:  # earlier days' runs, a copy of the real one each
            day -= dt.timedelta(days=1)
            for store in stores:
                run = Path(store, "vm_traffic", f"{VM_TRAFFIC}-{DAYS[1]}", real)
                shutil.copytree(run, run.parent.with_name(f"{VM_TRAFFIC}-{day.isoformat()}") / real)
            stored += 1
        t, cpu = time.perf_counter(), time.process_time()
        quality.run(VM_TRAFFIC, DAYS[1], cfg, spark)
        stored += 1  # the gate stored its own
        gate = {"stored_results": stored, "wall_s": round(time.perf_counter() - t, 2)}
        gate["python_cpu_s"] = round(time.process_time() - cpu, 2)
        out["gates"].append(gate)
    print(json.dumps(out))
    spark.stop()


if __name__ == "__main__":
    main()
