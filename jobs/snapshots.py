"""Model snapshot files: a state_dict file plus a JSON of everything needed to rebuild the model.

Layout under ``snapshots_root`` (default <lakehouse_root>/snapshots; any pyarrow filesystem):
    fm/ds=<trained_through_ds>/
    vm/<vm>/<method>/ds=<trained_through_ds>/
each holding ``model-<sha12>.pt`` and ``meta.json``. meta.json is written last and names the
model file with its sha256, so a crash mid-write leaves no snapshot that loads, and a loader
refuses bytes that do not match. Loading uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from dataclasses import dataclass

from jobs import faults
from jobs.config import ExfmConfig
from jobs.lakehouse import filesystem as _fs

META = "meta.json"


class SnapshotError(RuntimeError):
    """A snapshot is missing, incomplete or does not match its recorded sha256."""


def fm_uri(cfg: ExfmConfig, trained_through: dt.date) -> str:
    return f"{cfg.snapshots}/fm/ds={trained_through.isoformat()}"


def vm_uri(cfg: ExfmConfig, vm: str, method: str, trained_through: dt.date) -> str:
    return f"{cfg.snapshots}/vm/{vm}/{method}/ds={trained_through.isoformat()}"


@dataclass(frozen=True)
class Snapshot:
    uri: str
    meta: dict  # model config, encoder state, trained_through_ds, sha256, ...
    state: dict  # tensors: "model", "optimizer", ...


def save(uri: str, state: dict, meta: dict, *, kind: str = "model") -> dict:
    """Write the tensors, then meta.json naming them; returns the meta as written. ``kind``
    (fm, vm) names the writer for the crash-safety tests' failpoints (jobs/faults.py)."""
    import torch
    from pyarrow import fs as pafs

    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    sha = hashlib.sha256(payload).hexdigest()
    model_file = f"model-{sha[:12]}.pt"
    meta = {**meta, "model_file": model_file, "sha256": sha, "bytes": len(payload)}

    writer = f"snapshot/{kind}"
    faults.point(writer, "before_files")
    fs, path = _fs(uri)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{model_file}") as out:
        out.write(payload)
    faults.point(writer, "before_commit")
    tmp = f"{path}/.{META}.tmp"
    with fs.open_output_stream(tmp) as out:
        out.write(json.dumps(meta, indent=2, sort_keys=True, default=str).encode())
    fs.move(tmp, f"{path}/{META}")  # the commit point
    faults.point(writer, "after_commit")
    for info in fs.get_file_info(pafs.FileSelector(path)):  # files of an earlier run of the same day
        if info.base_name.startswith("model-") and info.base_name != model_file:
            fs.delete_file(info.path)
    return meta


def exists(uri: str) -> bool:
    from pyarrow import fs as pafs

    fs, path = _fs(uri)
    return fs.get_file_info(f"{path}/{META}").type == pafs.FileType.File


def read_meta(uri: str) -> dict:
    """A snapshot's meta.json alone (no tensors): what it is and what it was trained on."""
    fs, path = _fs(uri)
    if not exists(uri):
        raise SnapshotError(f"no snapshot at {uri} (missing {META})")
    with fs.open_input_stream(f"{path}/{META}") as f:
        return json.loads(f.read())


def load(uri: str) -> Snapshot:
    import torch

    fs, path = _fs(uri)
    meta = read_meta(uri)
    with fs.open_input_stream(f"{path}/{meta['model_file']}") as f:
        payload = f.read()
    sha = hashlib.sha256(payload).hexdigest()
    if sha != meta["sha256"]:
        raise SnapshotError(
            f"snapshot {uri}: {meta['model_file']} has sha256 {sha}, meta.json says {meta['sha256']}"
        )
    return Snapshot(uri, meta, torch.load(io.BytesIO(payload), weights_only=True))


def delete(uri: str) -> bool:
    """Remove a snapshot directory; False if it was already gone."""
    from pyarrow import fs as pafs

    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return False
    fs.delete_dir(path)
    return True


def size(uri: str) -> int:
    """Bytes of a snapshot directory (0 when it is gone)."""
    from jobs.lakehouse import tree_bytes

    return tree_bytes(*_fs(uri))


def trained_days(parent_uri: str) -> list[dt.date]:
    """Days that have a complete snapshot under a parent dir (e.g. snapshots/fm)."""
    from pyarrow import fs as pafs

    fs, path = _fs(parent_uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    days = []
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.base_name.startswith("ds=") and exists(f"{parent_uri}/{info.base_name}"):
            days.append(dt.date.fromisoformat(info.base_name[3:]))
    return sorted(days)
