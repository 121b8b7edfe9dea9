"""Safe file output: atomic writes that never overwrite by accident and never leave half files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mishield.errors import UsageError


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse early (before any expensive work) when `path` exists and overwriting was not asked for."""
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists; pass --overwrite to replace it or choose another --out.")
    if path.exists() and path.is_dir():
        raise UsageError(f"{path} is a directory; --out must name a file.")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    The temporary file lives in the destination directory so the final `os.replace` is atomic
    (same filesystem). On any exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if path.exists() and not overwrite:  # someone else wrote it meanwhile
            raise UsageError(f"{path} appeared while writing; pass --overwrite to replace it.")
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
