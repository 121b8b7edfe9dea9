"""Safe file output: atomic writes that never overwrite by accident, never leave half files, and
never replace a file the same run reads (docs/reliability.md)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from mishield.errors import UsageError

PathLike = str | os.PathLike


def _same_file(a: Path, b: Path) -> bool:
    # samefile compares (st_dev, st_ino) after following symlinks: it catches the same path
    # spelled differently, a symlink to the input and a hard link to it alike.
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one of them does not exist (an arch spec, a new output)
        return False


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except (OSError, ValueError, RuntimeError):  # RuntimeError: a symlink loop
        return False
    return True


def refuse_input_as_output(out: PathLike, inputs: Iterable[PathLike | None] = ()) -> None:
    """Raise UsageError (exit 2) when writing `out` would replace or pollute something this run reads.

    `out` is refused, `--overwrite` or not, when it is one of the input files (by inode, so
    symlinks and hard links count), when it would replace an existing file inside an input
    directory (an image of the training data), or when it is an input directory itself.
    Inputs that are not paths (an arch spec such as `torchvision:resnet18`, `none`) are skipped.
    """
    out = Path(out)
    for given in inputs:
        if given is None:
            continue
        source = Path(given)
        if not source.exists():
            continue
        if source.is_dir():
            replaces_data = out.exists() and not out.is_dir() and _inside(out, source)
            if _same_file(out, source) or replaces_data:
                raise UsageError(
                    f"--out {out} would overwrite the input {given} (or a file in it); "
                    "write the output somewhere else."
                )
        elif _same_file(out, source):
            raise UsageError(
                f"--out {out} is the input {given} (the same file, a link or a symlink to it); "
                "mishield never replaces its input, choose another --out."
            )


def refuse_output_dir_in_inputs(out_dir: PathLike, inputs: Iterable[PathLike | None] = ()) -> None:
    """An output *directory* must not be an input directory or lie inside one: its new files
    would become part of the data (a `grids/` class in an ImageFolder)."""
    out_dir = Path(out_dir)
    for given in inputs:
        if given is None:
            continue
        source = Path(given)
        if source.is_dir() and _inside(out_dir, source):
            raise UsageError(f"--out {out_dir} is inside the input folder {given}; write the report somewhere else.")
    refuse_input_as_output(out_dir, inputs)


def check_writable(path: PathLike, overwrite: bool, inputs: Iterable[PathLike | None] = ()) -> None:
    """Refuse early (before any expensive work) when `path` exists and overwriting was not asked
    for, names a directory, or is one of `inputs` (see `refuse_input_as_output`)."""
    path = Path(path)
    refuse_input_as_output(path, inputs)
    if path.exists() and path.is_dir():
        raise UsageError(f"{path} is a directory; --out must name a file.")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists; pass --overwrite to replace it or choose another --out.")
    for parent in path.parents:  # `--out model.pt/x` under a file fails after the run otherwise
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {path}: {parent} is a file, not a directory.")
            break


def check_writable_dir(path: PathLike, inputs: Iterable[PathLike | None] = ()) -> None:
    """An output directory (`audit --out DIR`): refused at once when it is an existing file or
    lies inside an input folder, before hours of work that could not be saved."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is an existing file; --out names a report directory.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {path}: {parent} is a file, not a directory.")
            break
    refuse_output_dir_in_inputs(path, inputs)


def _publish(tmp_path: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temporary file into place in one atomic step."""
    if overwrite:
        os.replace(tmp_path, path)
        return
    # link() fails if `path` exists, atomically: two runs racing for the same new output cannot
    # both "win" and silently replace each other (exists()-then-replace() could).
    try:
        os.link(tmp_path, path)
    except FileExistsError:
        raise UsageError(f"{path} appeared while writing; pass --overwrite to replace it.") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # A filesystem without hard links (some FUSE/SMB mounts): best effort, as before.
        if path.exists():
            raise UsageError(f"{path} appeared while writing; pass --overwrite to replace it.") from None
        os.replace(tmp_path, path)


@contextlib.contextmanager
def atomic_output(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    The temporary file lives in the destination directory so the final rename is atomic
    (same filesystem): readers see the old file or the whole new one, never a mix. On any
    exception (a full disk included) the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        _publish(tmp_path, path, overwrite)
    finally:
        tmp_path.unlink(missing_ok=True)


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
