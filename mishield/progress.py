"""The one way the library reports progress: plain callbacks, so it never depends on a terminal.

    def progress(description: str, done: int, total: int) -> None: ...
    def on_epoch(record: dict) -> None: ...

`progress` is called during long phases (every training step, prior training, the attack) with
host-side counters only, so reporting costs no device synchronisation. Training calls it with
the stage name ("stage1", "stage2", "finetune", "train", "prior") as description and the steps
done / total of that stage.

`on_epoch` is called once per completed epoch (rank 0 only) with that epoch's summary: always
"stage", "epoch" (global, 1-based), "epochs" where known, "seconds", plus the trainer's numbers
("train_loss", "train_acc", "val_acc", "lr" for classifiers; "loss_d", "loss_g" for the prior).
`format_epoch` turns it into one plain line, which is what the CLI prints per epoch, so a run
whose stderr is a log file (CI, Docker, nohup) still shows one line per epoch.

The CLI passes rich implementations (`mishield.cli.progress`); library users pass their own, or
None for silence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

ProgressCallback = Callable[[str, int, int], None]
EpochCallback = Callable[[Mapping[str, object]], None]

_SHOWN = (("train_loss", "loss", "{:.4f}"), ("loss_d", "loss D", "{:.4f}"), ("loss_g", "loss G", "{:.4f}"),
          ("train_acc", "train acc", "{:.1%}"), ("val_acc", "val acc", "{:.1%}"), ("lr", "lr", "{:.2g}"),
          ("seconds", "time", "{:.1f} s"))


def format_epoch(record: Mapping[str, object]) -> str:
    """One plain line for an epoch record, e.g. `finetune epoch 3/10: loss 0.4120, val acc 87.5 %, time 12.0 s`."""
    total = record.get("epochs")
    head = f"{record.get('stage', 'train')} epoch {record.get('epoch')}" + (f"/{total}" if total else "")
    parts = [f"{label} {fmt.format(record[key])}" for key, label, fmt in _SHOWN if record.get(key) is not None]
    return f"{head}: {', '.join(parts)}"
