"""Safe file output: atomic writes that never overwrite by accident, never leave half files, and
never replace a file the same run reads (docs/reliability.md)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from mishield.errors import MishieldError, OutputError, UsageError, first_line

try:
    import fcntl
except ImportError:  # not POSIX: outputs are not locked (docs/reliability.md)
    fcntl = None

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


def _paths(inputs: Iterable[PathLike | None]) -> list[PathLike]:
    """The inputs that are paths (an arch spec such as `torchvision:resnet18` or a loaded model is not)."""
    return [x for x in inputs if isinstance(x, (str, os.PathLike))]


def refuse_input_as_output(out: PathLike, inputs: Iterable[PathLike | None] = (), label: str | None = None) -> None:
    """Raise UsageError (exit 2) when writing `out` would replace or pollute something this run reads.

    `out` is refused, `--overwrite` or not, when it is one of the input files (by inode, so
    symlinks and hard links count), when it would replace an existing file inside an input
    directory (an image of the training data), or when it is an input directory itself.
    Inputs that are not paths (an arch spec such as `torchvision:resnet18`, `none`) are skipped.
    `label` names `out` in the message (default "--out OUT").
    """
    out = Path(out)
    label = label or f"--out {out}"
    for given in _paths(inputs):
        source = Path(given)
        if not source.exists():
            continue
        if source.is_dir():
            replaces_data = out.exists() and not out.is_dir() and _inside(out, source)
            if _same_file(out, source) or replaces_data:
                raise UsageError(
                    f"{label} would overwrite the input {given} (or a file in it); "
                    "write the output somewhere else."
                )
        elif _same_file(out, source):
            raise UsageError(
                f"{label} is the input {given} (the same file, a link or a symlink to it); "
                "mishield never replaces its input, choose another --out."
            )


def refuse_output_dir_in_inputs(out_dir: PathLike, inputs: Iterable[PathLike | None] = ()) -> None:
    """An output *directory* must not be an input directory or lie inside one: its new files
    would become part of the data (a `grids/` class in an ImageFolder)."""
    out_dir = Path(out_dir)
    for given in _paths(inputs):
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


def check_side_file(path: PathLike, inputs: Iterable[PathLike | None] = ()) -> None:
    """A file or folder a run writes, appends to or deletes beside its output (a training log, a
    resumable state, a search's work folder, a JUnit report), checked as `--out` is: refused (exit
    2) when it is one of `inputs` or holds one, when it would replace a file inside an input folder,
    or when it exists as something other than a regular file or folder (a FIFO would hang the
    run). It may exist: a run resumes from its state, `--overwrite` deletes it."""
    path = Path(path)
    label = f"{path}, which this run writes beside its output,"
    refuse_input_as_output(path, inputs, label)
    for given in _paths(inputs):
        if Path(given).exists() and _inside(Path(given), path):
            raise UsageError(f"{label} holds the input {given}; move the input or choose another --out.")
    kind = _existing_kind(path)
    if kind not in (None, "file", "directory"):
        raise UsageError(f"{label} is {kind}, not a regular file; remove it or choose another --out.")


def lock_path_for(out: PathLike) -> Path:
    """The lock file of an output: hidden, beside it (`.NAME.lock`), present only while a run holds it."""
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


_HELD: dict[Path, int] = {}  # lock files this process holds, and how many `output_lock` blocks hold each


@contextlib.contextmanager
def output_lock(out: PathLike) -> Iterator[None]:
    """Hold `out`'s lock for the block: a second run (another process) with the same output stops
    at once with UsageError (exit 2) instead of interleaving its files with this one's.

    An advisory `flock` on `lock_path_for(out)`, released by the kernel when the process dies (no
    stale locks after a kill -9); re-entrant within this process (`harden --search` hardens its pick
    into the same `out` it holds). Under torchrun only rank 0 writes, so only rank 0 locks.
    """
    from mishield.launch import torchrun_launch

    lock = lock_path_for(out).absolute()
    if lock in _HELD or not torchrun_launch().is_main or fcntl is None:  # no fcntl (Windows): no lock, see docs
        _HELD[lock] = _HELD.get(lock, 0) + 1
        try:
            yield
        finally:
            _HELD[lock] -= 1
            if not _HELD[lock]:
                del _HELD[lock]
        return
    fd = _acquire(lock, Path(out))
    _HELD[lock] = 1
    try:
        yield
    finally:
        del _HELD[lock]
        with contextlib.suppress(OSError):  # unlinked while still held, so no other run can lock the old inode
            lock.unlink()
        os.close(fd)


def _acquire(lock: Path, out: Path) -> int:
    """An open, flock-ed descriptor of `lock`; UsageError when another process holds it."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot write {out} ({err.strerror or first_line(err)}); choose another --out.") from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"cannot write {out} ({err.strerror or first_line(err)}); choose another --out.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"another mishield run is writing {out} (it holds {lock.name}); wait for it to finish "
                             "or choose another --out.") from None
        try:  # the holder before us may have unlinked the file we opened: lock the one at the path
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def claim_output(out: PathLike, overwrite: bool = False, inputs: Iterable[PathLike | None] = (),
                 side_files: Iterable[PathLike] = ()) -> Iterator[None]:
    """What every command that writes a file does before its work, as one step: `out` checked
    (`check_writable`: not an input, not an existing file without `overwrite`, a regular file in a
    writable folder), every one of `side_files` (the logs, resumable states and work folders the run
    writes, appends to or deletes beside `out`) checked against the same `inputs`
    (`check_side_file`), and `out` locked for the block (`output_lock`)."""
    inputs = _paths(inputs)
    check_writable(out, overwrite, inputs)
    for side in side_files:
        check_side_file(side, inputs)
    with output_lock(out):
        yield


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
        with _failed_writes_as_output_errors(path, tmp_path.parent):
            yield tmp_path
            # mkstemp creates 0600 files; give the output the permissions a plain open() would.
            os.chmod(tmp_path, 0o666 & ~_umask())
            _publish(tmp_path, path, overwrite)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def _failed_writes_as_output_errors(path: Path, directory: Path) -> Iterator[None]:
    """A failed write of `path` (in `directory`) re-raised as the one-sentence `OutputError` (exit 6)
    that `write_failure` makes of it; any other exception passes unchanged."""
    try:
        yield
    except Exception as err:
        failure = write_failure(err, path, directory)
        if failure is None:
            raise
        raise failure from None


@contextlib.contextmanager
def staged_folder(out_dir: PathLike, overwrite: bool = False, last: str | None = None) -> Iterator[Path]:
    """Yield a new temporary folder beside `out_dir` to write a whole folder of outputs into (a report).

    When the block succeeds the folder is put in place: renamed to `out_dir` in one step when that
    does not exist yet; else its files are moved in one by one (each with `atomic_output`'s rule:
    replaced only with `overwrite`), `last` (the file whose presence marks the folder complete,
    report.json) last of all. On any failure the temporary folder is removed and `out_dir` is
    untouched, so a reader never sees a mix of two runs' files.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    except OSError as err:
        raise OutputError(f"cannot write {out_dir} ({err.strerror or first_line(err)}); choose another --out.") from None
    try:
        with _failed_writes_as_output_errors(out_dir, out_dir.parent):
            yield staging
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; a report is shared like any folder
            _move_into_place(staging, out_dir, overwrite, last)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool, last: str | None) -> None:
    try:
        os.rename(staging, out_dir)  # a new folder appears whole; fails if out_dir exists and is not empty
        return
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY) and not out_dir.is_dir():
            raise
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(staging).as_posix() == last)  # stable: `last` moves last
    for source in files:
        target = out_dir / source.relative_to(staging)
        check_writable(target, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        _publish(source, target, overwrite)


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
