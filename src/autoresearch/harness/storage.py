"""Where the harness keeps its files, and how it writes them without leaving half-written ones."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import HarnessError


def cache_dir() -> Path:
    """The root of downloaded shards and prepared data: $AUTORESEARCH_CACHE or ~/.cache/autoresearch."""
    root = os.environ.get("AUTORESEARCH_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "autoresearch"


def ensure_writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
    except OSError as e:
        raise HarnessError(
            f"Cannot write to {path} ({e.strerror or e}). The harness keeps downloaded shards and "
            "prepared data there. Make the directory writable, or point AUTORESEARCH_CACHE (or "
            "--cache-dir) at a directory you can write to."
        ) from None
    return path


@contextmanager
def atomic_path(final: Path):
    """Yield a temporary path beside `final`; it becomes `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes it private; the final file is an ordinary one
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
