"""The JSON-lines training log written beside a trained model (one record per event)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


class JsonlLog:
    """Append-only JSON-lines training log (rank 0 writes; flushed per record)."""

    def __init__(self, path: Path | None, enabled: bool = True):
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "event": event, **fields}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return str(obj)
