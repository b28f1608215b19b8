"""Weights files by content: a checkpoint named in a study's settings or a cache key is recorded as
its sha256, so renaming the file changes nothing and changing its bytes changes the key."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str | None:
    """The file's sha256 (hex), or None when `path` is not a file."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
