"""Crash-safe file replacement, shared by model files and checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomically(path: str | os.PathLike, data: bytes, before_rename: Callable[[Path], None] | None = None) -> Path:
    """Write ``data`` to ``path`` so a crash leaves either the old file or the complete new one.

    Temporary file beside the target, fsync, rename over, fsync of the directory; on an
    OSError the temporary file is removed and the error re-raised.  ``before_rename`` gets the
    temporary path just before the rename (a hook for fault-injection tests).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return path
