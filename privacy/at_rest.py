"""State at rest: every file fedtune keeps is written whole or not at all, and readable by its owner only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, mode: int = 0o600) -> Path:
    """Replace `path` with `data`: a crash or power cut leaves the old file or the new one, never half of one.

    The temporary file is owner-only from its creation (then `mode`), so the content is never readable by
    others, even briefly; file and directory are fsynced so the rename itself survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh, unpredictable name created exclusively (O_EXCL, 0600): nothing planted beside the file (a
    # symlink in a shared folder) can redirect the write, and two writers never share a temporary file.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(directory: Path) -> None:
    """Make renames inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
