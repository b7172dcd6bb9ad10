"""Spark's Python daemon (``spark.python.daemon.module``) with the DAS's libraries already imported.

Spark forks every Python worker from one daemon per driver or executor, and a worker is new after
a minute idle: each new DAS worker imported torch, numpy and pyarrow again (~4 CPU-s, twice on
``local[2]``). Imported here once, every forked worker starts with them, as torch's DataLoader
workers do. Third-party libraries only: the project's modules are imported by each worker, so an
edit reaches the next worker of a long-lived Spark Connect server.
"""

import numpy  # noqa: F401
import pyarrow  # noqa: F401
import torch  # noqa: F401
from pyspark import daemon

if __name__ == "__main__":
    daemon.manager()
