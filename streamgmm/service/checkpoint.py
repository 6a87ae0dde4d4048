"""Checkpoints: versioned, checksummed, atomically written; the newest valid one wins.

File layout (never pickled)::

    STREAMGMM-CHECKPOINT\\n
    {"format_version": 1, "payload_bytes": N, "sha256": "..."}\\n
    <N bytes: an .npz holding the arrays and one JSON document for everything else>

A write goes to a temporary file, is fsynced, renamed over, and the directory fsynced, so a
crash leaves either the old set of checkpoints or the old set plus a complete new one.  A torn
or corrupted file fails its checksum on load and the previous checkpoint is used, loudly.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from ..mixture._atomic import write_atomically

log = logging.getLogger(__name__)

MAGIC = b"STREAMGMM-CHECKPOINT\n"
FORMAT_VERSION = 1
FILE_PATTERN = re.compile(r"^checkpoint-(\d{12})\.sgmm$")
# Fault injection for the crash tests: hold every write between the temporary file and the
# rename for this long, so a SIGKILL can land in the middle of a checkpoint. Never set it
# in production.
FAULT_PAUSE_ENV = "STREAMGMM_FAULT_CHECKPOINT_PAUSE_SECONDS"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


# --------------------------------------------------------------- (de)serialising
def pack(state: dict) -> bytes:
    """A nested dict of JSON values and numpy arrays as checkpoint file bytes."""
    arrays: dict[str, np.ndarray] = {}

    def strip(value, path):
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise CheckpointError(f"{path} is an object array; refusing to checkpoint it")
            arrays[path] = value
            return {"__ndarray__": path}
        if isinstance(value, dict):
            return {str(k): strip(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strip(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, np.generic):
            return value.item()
        return value

    document = strip(state, "")
    arrays["__document__"] = np.frombuffer(json.dumps(document, sort_keys=True).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    payload = buffer.getvalue()
    header = {"format_version": FORMAT_VERSION, "payload_bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def unpack(data: bytes, source: str = "checkpoint") -> dict:
    """Inverse of ``pack``; raises CheckpointError saying what is wrong."""
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{source} is not a streamgmm checkpoint (bad magic)")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise CheckpointError(f"{source} is truncated inside its header")
    try:
        header = json.loads(data[len(MAGIC):end])
    except ValueError:
        raise CheckpointError(f"{source} has a corrupt header") from None
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has format version {version!r}; this streamgmm reads version {FORMAT_VERSION}. "
            "Start from an empty checkpoint.dir or use the streamgmm release that wrote it"
        )
    payload = data[end + 1:]
    if len(payload) != header.get("payload_bytes"):
        raise CheckpointError(f"{source} is truncated: {len(payload)} of {header.get('payload_bytes')} payload bytes")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CheckpointError(f"{source} fails its checksum (corrupted on disk)")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {key: np.array(npz[key]) for key in npz.files}
        document = json.loads(bytes(arrays.pop("__document__")).decode())
    except (ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"{source} payload is unreadable: {exc}") from None

    def restore(value):
        if isinstance(value, dict):
            if set(value) == {"__ndarray__"}:
                return arrays[value["__ndarray__"]]
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    return restore(document)


# ------------------------------------------------------------------------ store
class CheckpointStore:
    """Numbered checkpoint files in one directory; keeps the newest ``keep``."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := FILE_PATTERN.match(p.name))]
        return [p for _, p in sorted(found)]

    def write(self, state: dict) -> Path:
        """Write atomically; returns the new file's path. Raises CheckpointError on failure."""
        data = pack(state)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            existing = self.paths()
            sequence = int(FILE_PATTERN.match(existing[-1].name).group(1)) + 1 if existing else 1
            path = write_atomically(self.directory / f"checkpoint-{sequence:012d}.sgmm", data, self._fault_pause)
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint in {self.directory}: {exc.strerror or exc}") from None
        self._prune()
        return path

    def load_latest(self) -> tuple[dict, Path] | None:
        """The newest checkpoint that reads back intact, or None if there is none.

        Corrupt ones are skipped with an error in the log (they are kept for inspection).
        """
        for path in reversed(self.paths()):
            try:
                return self.read(path), path
            except CheckpointError as exc:
                log.error("skipping checkpoint %s: %s; falling back to the previous one", path, exc)
        return None

    @staticmethod
    def read(path: Path) -> dict:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
        return unpack(data, str(path))

    @staticmethod
    def _fault_pause(tmp: Path) -> None:
        pause = float(os.environ.get(FAULT_PAUSE_ENV, "0") or 0)
        if pause > 0:
            log.warning("fault injection: checkpoint %s written but not renamed; pausing %.2f s", tmp.name, pause)
            time.sleep(pause)

    def _prune(self) -> None:
        for old in self.paths()[: -self.keep]:
            try:
                old.unlink()
            except OSError as exc:  # pruning is best effort; the next write tries again
                log.warning("cannot remove old checkpoint %s: %s", old, exc.strerror)
