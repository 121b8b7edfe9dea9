"""Safe file output: atomic writes that never overwrite by accident, never leave half files, and
never replace a file the same run reads (docs/reliability.md)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from mishield.errors import MishieldError, OutputError, UsageError, first_line

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


def _existing_kind(path: Path) -> str | None:
    """None when nothing is at `path`; else "file", "directory" or what else it is (after symlinks)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:  # a symlink loop, an unreadable parent: let the write say why
        return "file"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    return {stat.S_IFCHR: "a device", stat.S_IFBLK: "a device", stat.S_IFIFO: "a FIFO",
            stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(mode), "not a regular file")


def _refuse_unwritable_parent(path: Path) -> None:
    """`--out` under a folder this process cannot create files in: refused before the work (exit 6)."""
    for parent in path.parents:  # `--out model.pt/x` under a file fails after the run otherwise
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {path}: {parent} is a file, not a directory.")
            if not os.access(parent, os.W_OK | os.X_OK):
                try:
                    read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
                except OSError:
                    read_only = False
                cause = "a read-only file system" if read_only else "permission denied"
                raise OutputError(f"cannot write --out {path}: {parent} is not writable ({cause}); choose another --out.")
            return


def check_writable(path: PathLike, overwrite: bool, inputs: Iterable[PathLike | None] = ()) -> None:
    """Refuse early (before any expensive work) when `path` exists and overwriting was not asked
    for, is anything but a regular file (a directory, a device such as /dev/null, a FIFO: replacing
    it with a file would break whatever uses it), is one of `inputs` (see `refuse_input_as_output`),
    or lies in a folder that cannot be written (`OutputError`, exit 6)."""
    path = Path(path)
    refuse_input_as_output(path, inputs)
    kind = _existing_kind(path)
    if kind == "directory":
        raise UsageError(f"{path} is a directory; --out must name a file.")
    if kind not in (None, "file"):
        raise UsageError(f"--out {path} is {kind}, not a regular file; mishield replaces only regular files, even with --overwrite.")
    if kind == "file" and not overwrite:
        raise UsageError(f"{path} already exists; pass --overwrite to replace it or choose another --out.")
    _refuse_unwritable_parent(path)


def check_writable_dir(path: PathLike, inputs: Iterable[PathLike | None] = ()) -> None:
    """An output directory (`audit --out DIR`): refused at once when it is an existing file or
    lies inside an input folder, before hours of work that could not be saved."""
    path = Path(path)
    kind = _existing_kind(path)
    if kind == "file":
        raise UsageError(f"--out {path} is an existing file; --out names a report directory.")
    if kind not in (None, "directory"):
        raise UsageError(f"--out {path} is {kind}, not a folder; --out names a report directory.")
    _refuse_unwritable_parent(path)
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OutputError(f"cannot write {path} ({err.strerror or first_line(err)}); choose another --out.") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        _publish(tmp_path, path, overwrite)
    except Exception as err:
        failure = write_failure(err, path, tmp_path.parent)
        if failure is None:
            raise
        raise failure from None
    finally:
        tmp_path.unlink(missing_ok=True)


# torch's zip writer reports a failed write as a RuntimeError from its C++ side ("[enforce fail at
# inline_container.cc:...] unexpected pos 704 vs 598" on a full disk), never as an OSError.
_TORCH_WRITER_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed")
FULL_BELOW = 1 << 20  # free bytes under which a failed write is put down to a full disk


def _free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may write into the reserve
    return blocks * st.f_frsize


def write_failure(err: Exception, path: Path, directory: Path) -> OutputError | None:
    """The `OutputError` (exit 6) a failed write of `path` becomes, or None when `err` is not one.

    Called while the partial temporary file still exists, so a full disk still reads as full.
    """
    text = str(err)
    if isinstance(err, MishieldError):  # e.g. "appeared while writing" (exit 2): already one sentence
        return None
    if isinstance(err, OSError):
        cause = err.strerror or first_line(err)
    elif isinstance(err, RuntimeError) and any(s in text for s in _TORCH_WRITER_FAILURES):
        cause = f"torch's writer failed: {first_line(err)}"
    elif type(err).__name__ == "SafetensorError" and "I/O error" in text:  # safetensors' Rust io::Error
        cause = first_line(err).split("I/O error: ", 1)[-1]
    else:
        return None
    free = _free_bytes(directory)
    if not isinstance(err, OSError) and free is not None and free < FULL_BELOW:
        cause = "no space left on the device"
    return OutputError(f"cannot write {path} ({cause}); free space or choose another --out.")


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
