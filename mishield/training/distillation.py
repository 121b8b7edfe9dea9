"""Surrogate models distilled from the target: LOMMA's "model augmentation" (Nguyen et al., CVPR 2023).

An adaptive attacker who faces a target whose skip connections were removed or scaled (RoLSS,
SSF) can train *surrogate* classifiers to imitate it — from the target's soft outputs on public
images, never the private data — and then attack the target and the surrogates together. A
surrogate with skip connections (a ResNet, the default) regains the gradient paths the defence
took away; an audit that ignores this case measures only the attacker the defence was built
against (docs/audit.md, "Surrogate models").

    result = train_surrogate("target.pt", "public/", "surrogate.pt")
    # the audit loads it back: mishield.audit.surrogates.load_surrogates(["surrogate.pt"], target_sha256)

Training reuses the shared trainer (`mishield.training.fit` with a distillation `Criterion`), so
it has the other trainers' guarantees: a resumable state after every epoch, Ctrl-C (130) and
SIGTERM (143) leave a resumable state, progress and per-epoch callbacks, an atomic output. The
student sees exactly what the target sees (the target's input size and normalisation, recorded
in its file). A seeded fraction of the public images is held out, and the student's top-1
agreement with the target on them is recorded: a surrogate that disagrees with its target is a
weak attacker, and that must be visible (`MIN_AGREEMENT`).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mishield.configs import resolve_config
from mishield.errors import BadInputError, UsageError
from mishield.progress import EpochCallback, ProgressCallback

DEFAULT_SURROGATE_ARCH = "torchvision:resnet18"  # with skips: the adaptive case the issue asks for
# Measured on the embedded Fashion-MNIST at 32 px (1800 public images of classes 5-9, a small ResNet
# target trained on 0-4): held-out agreement 0.81 after 6 epochs, 0.85 after 10; 8-10 s an epoch
# on one CPU thread of an otherwise quiet machine.
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 1e-3
DEFAULT_TEMPERATURE = 4.0  # Hinton et al.'s range (2-5): soft enough to carry the target's ranking of classes
# Below this held-out agreement a surrogate is reported as weak (load_surrogates warns): it then
# imitates its target too poorly for its gradients to stand in for the target's.
MIN_AGREEMENT = 0.5
SURROGATE_ROLE = "surrogate"


@dataclass
class SurrogateResult:
    """What `train_surrogate` made: the file, and how well the student agrees with its target."""

    out: Path
    arch: str
    target_sha256: str
    target_name: str
    num_classes: int
    input_size: list[int]
    agreement: float  # top-1 agreement (student argmax == target argmax) on the held-out public images
    agreement_n: int  # how many held-out images it was measured on
    temperature: float
    epochs: int
    public_images: int  # training images (the held-out ones excluded)
    public_fingerprint: dict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_epoch: int | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The `mishield surrogate train --json` document (mishield/schemas/surrogate-train.schema.json)."""
        d = asdict(self)
        d["out"] = str(self.out)
        d["seconds"] = round(self.seconds, 2)
        d["min_agreement"] = MIN_AGREEMENT
        return d


class Distillation:
    """The distillation `Criterion` (`mishield.training.loop`): KL(target/T || student/T) * T^2.

    The teacher's logits are computed on the fly, without gradients, on the same augmented batch
    the student sees; the T^2 factor keeps the gradient scale independent of T (Hinton et al.,
    2015). "Correct" counts agreement with the teacher's argmax, so the training accuracy the
    trainer reports is the running agreement.
    """

    def __init__(self, teacher: nn.Module, temperature: float, identity: dict | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        # What a resumed run must share besides the recipe and data (`fit` adds it to the state's fingerprint).
        self.fingerprint = {**(identity or {}), "temperature": temperature}

    def __call__(self, logits: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if next(self.teacher.parameters(), x).device != x.device:
            self.teacher.to(x.device)
        with torch.no_grad():
            teacher = self.teacher(x).float()
        t = self.temperature
        loss = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1),
                        log_target=True, reduction="batchmean") * t * t
        return loss, teacher.argmax(dim=1)


def public_items(public: str | Path) -> tuple[list, list[str]]:
    """Every image under `public` and its class names: an ImageFolder (train/ and val/ pooled) or a
    flat folder of images (one class, "public"). Labels are never used for training."""
    from mishield.data import IMAGE_EXTENSIONS, load_image_folders

    public = Path(public)
    if public.is_dir() and not any(p.is_dir() for p in public.iterdir()):
        files = sorted(p for p in public.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise BadInputError(f"{public} holds no images; pass a folder of public images (flat or one sub-folder per class).")
        return [(p, 0) for p in files], ["public"]
    splits = load_image_folders(public)
    return sorted(splits.train + splits.val), splits.classes


def split_public(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random hold-out of `val_fraction` of the images (at least one on each side)."""
    if len(items) < 2:
        raise BadInputError(f"the public folder has {len(items)} image(s); distillation needs at least 2 (train and held out).")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    n_val = min(max(1, round(val_fraction * len(items))), len(items) - 1)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


@torch.no_grad()
def target_labels(model: nn.Module, items: list, preprocessing, *, device: str | torch.device = "cpu",
                  batch_size: int = 256) -> list:
    """`items` relabelled with the target's argmax (eval transform): the labels agreement is measured against."""
    from torch.utils.data import DataLoader

    from mishield.data import ImageDataset, eval_transform

    model = model.eval().to(device)
    loader = DataLoader(ImageDataset(items, eval_transform(preprocessing), channels=preprocessing.input_size[0]),
                        batch_size=batch_size, shuffle=False)
    labels = [int(v) for x, _ in loader for v in model(x.to(device)).argmax(dim=1).cpu()]
    return [(path, label) for (path, _), label in zip(items, labels)]


def _load_target(target, load_options: dict | None, resolution: int | None, items: list):
    """The target as a LoadedModel at the resolution it is attacked at, identified by its file's sha256."""
    from mishield.data import fit_resolution
    from mishield.models import LoadedModel, load_model
    from mishield.models.introspect import count_classes

    options = dict(load_options or {})
    if resolution is not None:
        options["input_size"] = resolution
    if isinstance(target, LoadedModel):
        loaded = target
        if resolution is not None:
            loaded = dataclasses.replace(loaded, preprocessing=loaded.preprocessing.with_input_size(resolution))
    else:
        loaded = load_model(str(target), **options)
    loaded = fit_resolution(loaded, items, options.get("input_size") is not None or isinstance(target, LoadedModel))
    if not loaded.source_sha256:
        raise BadInputError(
            f"the target {loaded.arch} has no file to identify it by; save it first (mishield.save_model) and "
            "distil from the file, so an audit can match the surrogate to it by sha256."
        )
    num_classes = loaded.num_classes or count_classes(loaded.model)
    if not num_classes:
        raise BadInputError(f"cannot tell how many classes {loaded.source} has; pass --num-classes.")
    return loaded, num_classes


def _student(arch: str, num_classes: int, channels: int) -> nn.Module:
    from mishield.models import build_architecture
    from mishield.models.introspect import _first_conv_channels

    student = build_architecture(arch, num_classes)
    takes = _first_conv_channels(student)
    if takes is not None and takes != channels:
        raise BadInputError(
            f"the surrogate architecture {arch} takes {takes}-channel images but the target takes {channels}; "
            "choose an --arch with a matching first layer."
        )
    return student


@dataclass(frozen=True)
class SurrogateConfig:
    """How to distil a surrogate: the student `arch` (default a ResNet-18, with skips: the adaptive
    case), `epochs`, `batch_size`, `lr`, the distillation `temperature`, `resolution` (default the
    target's), `val_fraction` of the public images held out to measure agreement, `device`, `seed`,
    `workers`, `resume`, `overwrite` and `trust_checkpoint` (for the target file)."""

    arch: str = DEFAULT_SURROGATE_ARCH
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    temperature: float = DEFAULT_TEMPERATURE
    resolution: int | None = None
    device: str | torch.device = "auto"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    trust_checkpoint: bool = False
    val_fraction: float = 0.1
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"`epochs` must be at least 1, got {self.epochs}.")
        if self.batch_size < 2:
            raise UsageError(f"`batch_size` must be at least 2 (batch norm needs two images), got {self.batch_size}.")
        if not self.lr > 0:
            raise UsageError(f"`lr` must be a positive number, got {self.lr}.")
        if not self.temperature > 0:
            raise UsageError(f"`temperature` must be a positive number, got {self.temperature}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"`val_fraction` must lie strictly between 0 and 1, got {self.val_fraction}.")


def train_surrogate(
    target,
    public: str | Path,
    out: str | Path,
    *,
    config: SurrogateConfig | None = None,
    progress: ProgressCallback | None = None,
    on_epoch: EpochCallback | None = None,
    load_options: dict | None = None,
    **keywords,
) -> SurrogateResult:
    """Distil `arch` from `target`'s soft outputs on the public images in `public`; write it to `out`.

    `target` is a model file (or a `LoadedModel` loaded from one); a plain state dict needs
    `load_options={"arch": ..., "num_classes": ...}` as in every other command. `resolution`
    overrides the target's input size (default: what its file records, or for a plain state dict
    the data's, as `harden` and `audit` decide). `public` is an ImageFolder or a flat folder of
    images; labels are ignored. `out` is a mishield model file whose recipe records
    `surrogate: {target_sha256, target_name, arch, agreement, agreement_n, temperature, epochs,
    public_fingerprint}`; `OUT.train-state` sits beside it while training (`config.resume`).
    `config` (`SurrogateConfig`) says how; the former keyword form (`arch=`, `epochs=`, ...) is deprecated.
    """

    from mishield.fileio import claim_output
    from mishield.training.state import refuse_stale_state, state_path_for

    c = resolve_config("train_surrogate", config, keywords, SurrogateConfig)
    out = Path(out)
    state_path = state_path_for(out)
    with claim_output(out, c.overwrite, (target, public), (state_path,)):  # checked against the inputs, locked
        refuse_stale_state(state_path, c.resume, c.overwrite)
        return _distil(target, public, out, c, progress, on_epoch, load_options)


def _distil(target, public, out: Path, c: SurrogateConfig, progress, on_epoch, load_options) -> SurrogateResult:
    import time

    from mishield.data import DataSplits, data_fingerprint
    from mishield.runtime import resolve_device
    from mishield.training import RunOptions, TrainingRecipe, evaluate_accuracy, fit
    from mishield.training.state import state_path_for

    arch, epochs, batch_size, lr, temperature, seed = c.arch, c.epochs, c.batch_size, c.lr, c.temperature, c.seed
    resume, overwrite, val_fraction = c.resume, c.overwrite, c.val_fraction
    state_path = state_path_for(out)
    items, classes = public_items(public)
    options = {**(load_options or {}), "trust_checkpoint": c.trust_checkpoint or (load_options or {}).get("trust_checkpoint", False)}
    loaded, num_classes = _load_target(target, options, c.resolution, items)
    pre = loaded.preprocessing
    device = resolve_device(c.device)
    train, held_out = split_public(items, val_fraction, seed)
    held_out = target_labels(loaded.model, held_out, pre, device=device, batch_size=max(batch_size, 64))
    torch.manual_seed(seed)
    student = _student(arch, num_classes, pre.input_size[0])
    target_name = loaded.source.name if loaded.source else str(loaded.arch)
    names = list((loaded.recipe or {}).get("classes") or [str(i) for i in range(num_classes)])
    t0 = time.perf_counter()
    criterion = Distillation(loaded.model, temperature, {"teacher_sha256": loaded.source_sha256, "arch": arch})
    result = fit(student, DataSplits(train, held_out, names), pre,
                 TrainingRecipe(schedule="finetune", epochs=epochs, lr=lr, batch_size=batch_size, seed=seed),
                 options=RunOptions(device=device, workers=c.workers, state_path=state_path, resume=resume),
                 num_classes=num_classes, progress=progress, on_epoch=on_epoch, criterion=criterion)
    agreement = evaluate_accuracy(result.model, held_out, pre, device=device, batch_size=max(batch_size, 64))
    fingerprint, _ = data_fingerprint(items, classes)
    record = {"target_sha256": loaded.source_sha256, "target_name": target_name, "arch": arch,
              "agreement": agreement, "agreement_n": len(held_out), "temperature": temperature, "epochs": epochs,
              "public_fingerprint": fingerprint}
    training = {"role": SURROGATE_ROLE, "data": str(public), "epochs": epochs, "lr": lr, "batch_size": batch_size,
                "seed": seed, "val_fraction": val_fraction, "train_images": len(train), "history": result.history}
    _save(out, result.model, arch, num_classes, pre, loaded, record, training, overwrite)
    state_path.unlink(missing_ok=True)  # the finished surrogate supersedes the resumable state
    return SurrogateResult(
        out=out, arch=arch, target_sha256=loaded.source_sha256, target_name=target_name, num_classes=num_classes,
        input_size=list(pre.input_size), agreement=agreement, agreement_n=len(held_out), temperature=temperature,
        epochs=epochs, public_images=len(train), public_fingerprint=fingerprint, history=result.history,
        seconds=time.perf_counter() - t0, resumed_from_epoch=result.resumed_from_epoch,
        warnings=[w for w in [weak_agreement_warning(out, agreement, len(held_out))] if w],
    )


def _save(out: Path, model: nn.Module, arch: str, num_classes: int, pre, loaded, record: dict, training: dict,
          overwrite: bool) -> None:
    from mishield.models import save_model

    save_model(out, model, arch=arch, num_classes=num_classes, surgery=None, preprocessing=pre, source=loaded.source,
               extra={"surrogate": record, "training": training,
                      "metrics": {"agreement": record["agreement"], "agreement_n": record["agreement_n"]},
                      "classes": list((loaded.recipe or {}).get("classes") or [])},
               overwrite=overwrite)


def weak_agreement_warning(path, agreement: float, n: int) -> str | None:
    if agreement >= MIN_AGREEMENT:
        return None
    return (f"the surrogate {Path(path).name} agrees with its target on only {100 * agreement:.1f} % of {n} held-out "
            f"public images (floor {100 * MIN_AGREEMENT:.0f} %): a weak stand-in, so the adaptive attack it "
            "drives understates what a careful attacker achieves; distil longer or from more public images.")
