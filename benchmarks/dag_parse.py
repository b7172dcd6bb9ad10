"""DAG parse time: what the dag-processor pays for dags/exfm_daily.py on every re-parse.

    ./exfm python benchmarks/dag_parse.py [--repeat 5]

Each repeat is a fresh interpreter that imports Airflow first (the dag-processor has it loaded),
then times parsing the file alone, as Airflow's own DagBag does it; also lists any heavy module
the parse pulled in (there should be none).
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

DAGS = Path(__file__).resolve().parents[1] / "dags"
PROBE = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
import airflow.sdk  # loaded in a dag-processor before any DAG file
t = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.perf_counter() - t
heavy = sorted(m for m in ("torch", "pyspark", "great_expectations", "jobs") if m in sys.modules)
out = {"seconds": seconds, "dags": sorted(bag.dags), "errors": len(bag.import_errors), "heavy": heavy}
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    runs = []
    for _ in range(args.repeat):
        out = subprocess.run(
            [sys.executable, "-c", PROBE, str(DAGS)], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    times = [r["seconds"] for r in runs]
    print(
        f"parse {DAGS}: median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms "
        f"over {len(times)} fresh processes; dags={runs[0]['dags']} errors={runs[0]['errors']} "
        f"heavy imports={runs[0]['heavy'] or 'none'}"
    )


if __name__ == "__main__":
    main()
