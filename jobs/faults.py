"""Failpoints: the crash-safety tests kill a real writer with SIGKILL at a named point of a write.

``EXFM_FAILPOINT=<writer>@<when>`` names one; ``writer`` is a table (``vm_traffic``,
``_staging/vm_traffic``, ``fm_snapshots``, ...) or a snapshot kind (``snapshot/fm``,
``snapshot/vm``), ``when`` one of:

- ``before_files``: the write starts and the process dies before a byte is written;
- ``before_commit``: the process dies once the write's first data file exists and before it
  commits (Delta: a thread watches the table's directory for a new data file, so the kill lands
  in the rest of the Spark job or the commit; a snapshot: the model file is written, meta.json
  is not);
- ``after_commit``: the write committed and the process dies before its next step.

Without the variable (every real run) each point costs one environment lookup.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
WHEN = ("before_files", "before_commit", "after_commit")


def _armed(writer: str) -> str | None:
    spec = os.environ.get("EXFM_FAILPOINT", "")
    name, _, when = spec.partition("@")
    return when if name == writer else None


def point(writer: str, when: str) -> None:
    """Die here if EXFM_FAILPOINT names this writer and point."""
    if _armed(writer) == when:
        _kill(f"{writer}@{when}")


@contextmanager
def delta_write(writer: str, path: str):
    """Around one Delta commit of ``writer`` to the table at ``path`` (a local path when armed)."""
    when = _armed(writer)
    if when == "before_files":
        _kill(f"{writer}@{when}")
    stop = threading.Event()
    if when == "before_commit":
        root = Path(path.removeprefix("file:"))
        before = _data_files(root)
        threading.Thread(target=_kill_on_new_file, args=(root, before, stop, writer), daemon=True).start()
    try:
        yield
    finally:
        stop.set()
    if when in ("before_commit", "after_commit"):  # a commit quicker than the watcher: after it
        _kill(f"{writer}@after_commit (armed {when})")


def _data_files(root: Path) -> set[str]:
    if not root.exists():
        return set()
    return {str(p) for p in root.rglob("*.parquet") if "_delta_log" not in p.parts}


def _kill_on_new_file(root: Path, before: set[str], stop: threading.Event, writer: str) -> None:
    while not stop.is_set():
        if _data_files(root) - before:
            _kill(f"{writer}@before_commit")
        time.sleep(0.001)


def _kill(what: str) -> None:
    log.error("failpoint %s: killing the process", what)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)
