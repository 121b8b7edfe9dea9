"""Reading a pickle's imports from its opcodes, without executing anything.

Used to refuse a checkpoint that would import code, naming the globals it needs, so the user can
decide whether to pass `trust_checkpoint=True` (`--trust-checkpoint`).
"""

from __future__ import annotations

import contextlib
import io
import pickletools
import re
import zipfile
from pathlib import Path

import torch

_SCAN_LIMIT = 64 << 20  # the object graph of a legacy/raw pickle precedes its tensor bytes
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_MEMO_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_NON_PUSHING_OPS = {"MEMOIZE", "FRAME", "PROTO"} | _MEMO_PUT_OPS
# Shown first: these are how a malicious pickle reaches a shell or the interpreter.
_RISKY_MODULES = {"os", "posix", "nt", "subprocess", "builtins", "__builtin__", "sys", "shutil", "socket",
                  "importlib", "runpy", "pty", "code", "codeop", "pickle", "marshal", "ctypes", "webbrowser"}


def scan_pickle_globals(data: bytes) -> tuple[list[str], str]:
    """Globals (`module.name`) that unpickling `data` would import, read from opcodes only.

    Handles protocol 0-5 (GLOBAL, INST, and STACK_GLOBAL resolved through the strings pushed or
    fetched from the memo just before it) and several pickles back to back (torch's legacy
    format). Returns the globals in first-seen order and how parsing ended: "complete" (a whole
    pickle parsed), "truncated" (data ended inside a pickle), or "invalid" (not a pickle).
    """
    stream = io.BytesIO(data)
    found: list[str] = []
    state = "invalid"
    while stream.tell() < len(data):
        memo: dict = {}
        pushed: list = []
        try:
            for op, arg, _ in pickletools.genops(stream):
                kind = op.name
                if kind in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    found.append(f"{module}.{attr}")
                    pushed.append(None)
                elif kind == "STACK_GLOBAL":
                    module, attr = ([None, None] + pushed[-2:])[-2:]
                    ok = isinstance(module, str) and isinstance(attr, str)
                    found.append(f"{module}.{attr}" if ok else "<an obfuscated global>")
                    del pushed[-2:]
                    pushed.append(None)
                elif kind in _STRING_OPS:
                    pushed.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
                elif kind in _MEMO_GET_OPS:
                    pushed.append(memo.get(arg))
                elif kind == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif kind in _MEMO_PUT_OPS:
                    memo[arg] = pushed[-1] if pushed else None
                elif kind not in _NON_PUSHING_OPS:
                    pushed.append(None)
                if len(pushed) > 256:
                    del pushed[:-8]
        except Exception as e:  # noqa: BLE001 - pickletools on arbitrary bytes
            # Only claim truncation for something that started like a pickle (PROTO opcode).
            ran_out = any(s in str(e) for s in ("exhausted", "remain", "not enough data"))
            if data[:1] == b"\x80" and ran_out and state == "invalid":
                state = "truncated"
            break
        state = "complete"
    return list(dict.fromkeys(found)), state


def _allowed_globals() -> set[str]:
    allowed = {"argparse.Namespace", "collections.OrderedDict"}
    # Private API; without it, fall back to the tensor-rebuilding functions below.
    with contextlib.suppress(ImportError, AttributeError, TypeError):
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed |= set(_get_allowed_globals())
    for obj in torch.serialization.get_safe_globals():
        if not isinstance(obj, tuple):
            allowed.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
    return allowed


def _is_allowed(name: str, allowed: set[str]) -> bool:
    return name in allowed or name.startswith(("torch._utils._rebuild", "torch._tensor._rebuild")) or bool(
        re.fullmatch(r"torch\.(cuda\.)?[A-Za-z0-9]*Storage", name)
    )


def _python3_name(name: str) -> str:
    """Apply the renames Python 3's unpickler applies to protocol 0-2 pickles (`__builtin__.set`)."""
    import _compat_pickle

    module, _, attr = name.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{attr}"


def pickle_imports(path: Path) -> tuple[list[str], str]:
    """The non-tensor globals the file's pickle would import, riskiest first, and the parse state."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                pkl = next(n for n in zf.namelist() if re.match(r"^([^/]+/)?data\.pkl$", n))
                with zf.open(pkl) as f:
                    data = f.read(_SCAN_LIMIT)
        else:
            with open(path, "rb") as f:
                data = f.read(_SCAN_LIMIT)
    except (OSError, StopIteration, zipfile.BadZipFile):
        return [], "invalid"
    names, state = scan_pickle_globals(data)
    names = list(dict.fromkeys(_python3_name(n) for n in names))
    allowed = _allowed_globals()
    unsafe = [n for n in names if not _is_allowed(n, allowed)]
    unsafe.sort(key=lambda n: n.split(".")[0] not in _RISKY_MODULES)  # stable: keeps first-seen order otherwise
    return unsafe, state
