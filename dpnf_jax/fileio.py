"""Atomic file and directory writes: a failed run never leaves a half-written output."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    The file gets the usual permissions (0666 minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def new_staging_dir(path: str | os.PathLike) -> Path:
    """An empty directory beside ``path`` to fill before :func:`publish_dir`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-", dir=path.parent))
    os.chmod(stage, 0o777 & ~_umask())
    return stage


def publish_dir(stage: Path, path: str | os.PathLike) -> Path:
    """Rename the filled ``stage`` to ``path``, replacing an existing directory there."""
    path = Path(path)
    if path.exists():
        graveyard = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, graveyard / "old")
        os.replace(stage, path)
        shutil.rmtree(graveyard, ignore_errors=True)
    else:
        os.replace(stage, path)
    return path


def read_versioned_json(path: Path, fmt: str, version: int, what: str) -> dict:
    """Read a JSON file that must carry ``{"format": fmt, "version": version}``.

    Raises:
      ValueError: naming the file, for unparsable text, a foreign format or another version.
    """
    try:
        meta = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: corrupted {what} metadata ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: not a dpnf-jax {what} (format {found!r})")
    if meta.get("version") != version:
        raise ValueError(f"{path}: unsupported {what} version {meta.get('version')!r} (this is {version})")
    return meta
