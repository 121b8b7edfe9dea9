"""Trust checks of an audit's inputs: the evaluation model, the target for a gate, the prior.

An audit's number is only as good as the classifier that judges it and the prior it searches.
Each check here either refuses the audit (`BadInputError`, exit 3, one sentence) or returns the
figures the report carries (docs/audit.md "Trust checks" gives the floors and why):

- the evaluation model must know the private classes under the same names in the same order,
  must not be the target, and must recognise the private *validation* images at the attack's
  resolution (downsized to the prior's output size, then resized as the attack resizes
  reconstructions) at least `accuracy_floor` of the time, by the lower end of the accuracy's
  Wilson interval; under a gate it must have been trained on the audited private images (its
  recorded data fingerprint);
- a target whose natural accuracy cannot be told apart from chance cannot be gated: a failed
  attack on a model that learned nothing looks exactly like privacy; a target whose forward is a
  program (TorchScript, torch.export, a pickled module, a `package.module:factory` architecture)
  is gated only with `--trust-checkpoint`, and its verdict says the figures cover the program;
- the private images must not be among the prior's training images (their pixel hashes are in
  the prior file), or the "reconstructions" are recollections of public data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from mishield.audit.stats import chance_level, wilson_interval
from mishield.errors import BadInputError

# The share of the way from chance to perfect an evaluator must cover (docs/audit.md "Trust checks").
FLOOR_SHARE = 0.5


def accuracy_floor(num_classes: int) -> float:
    """chance + 0.5 (1 - chance): 0.55 for 10 classes, 0.75 for 2, ~0.5 for 1000."""
    c = chance_level(num_classes)
    return c + FLOOR_SHARE * (1.0 - c)


def weights_digest(model: nn.Module) -> str:
    """sha256 over the sorted digests of every parameter and buffer tensor.

    Sorted tensor digests, not names, so the same weights under another wrapper or key prefix
    (a state dict re-saved as a mishield file, a module inside another) give the same digest.
    """
    parts = []
    for t in model.state_dict().values():
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        data = t.detach().cpu().contiguous().float().numpy().tobytes()  # float: bf16/fp16 copies match fp32 ones
        parts.append(hashlib.sha256(f"{tuple(t.shape)}".encode() + data).hexdigest())
    return hashlib.sha256("".join(sorted(parts)).encode()).hexdigest()


def check_classes(eval_classes: Sequence[str] | None, data_classes: Sequence[str], eval_name: str) -> bool | None:
    """Refuse an evaluator whose recorded class names differ from the data's; None when it records none."""
    if eval_classes is None:
        return None
    eval_classes, data_classes = list(eval_classes), list(data_classes)
    if eval_classes == data_classes:
        return True
    if sorted(eval_classes) == sorted(data_classes):
        i = next(i for i, (a, b) in enumerate(zip(eval_classes, data_classes)) if a != b)
        raise BadInputError(
            f"the evaluation model {eval_name} has the private classes in another order (permuted classes: its class {i} is "
            f"{eval_classes[i]!r}, the data's is {data_classes[i]!r}), so it would file every reconstruction under a wrong label; "
            "retrain it on this data with mishield train-eval."
        )
    extra = sorted(set(eval_classes) - set(data_classes))[:3]
    missing = sorted(set(data_classes) - set(eval_classes))[:3]
    raise BadInputError(
        f"the evaluation model {eval_name} was trained on other classes than the private data (it has {extra or 'none'} "
        f"the data lacks, the data has {missing or 'none'} it lacks); retrain it on this data with mishield train-eval."
    )


def check_not_target(evaluation, targets) -> None:
    """Refuse an evaluator that is one of the audited models (same file or same weights)."""
    digest = weights_digest(evaluation.model)
    for t in targets:
        same_file = evaluation.info.get("sha256") and evaluation.info.get("sha256") == t.info.get("sha256")
        if same_file or t.model is evaluation.model or weights_digest(t.model) == digest:
            raise BadInputError(
                f"the evaluation model {evaluation.name} is the audited model {t.name} (same weights); a target judging its own "
                "reconstructions counts its adversarial shortcuts as leaks or misses — train an independent one with mishield train-eval."
            )


def degraded_batches(items: Sequence, image_shape: Sequence[int], batch: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Private `(path, label)` items as the attack's images: uint8 (N, C, H, W) at the prior's size.

    Read with the prior's channel count and resized (PIL, antialiased) to the prior's output
    resolution, so the evaluator sees private images through the same degradation and the same
    resize (`Evaluator.images`) as the reconstructions: neither sharper nor softer.
    """
    import numpy as np
    from PIL import Image

    from mishield.data import decode_image

    channels, height, width = (int(v) for v in image_shape)
    mode = "L" if channels == 1 else "RGB"
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        arrays = []
        for path, _ in chunk:
            img = decode_image(path, mode).resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None)
            a = np.asarray(img, dtype=np.uint8)
            arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        yield torch.from_numpy(np.stack(arrays)), torch.tensor([y for _, y in chunk])


def evaluator_accuracy(evaluator, items: Sequence, image_shape: Sequence[int]) -> tuple[float | None, int]:
    """The evaluator's top-1 accuracy on `items` degraded to the attack's resolution, and the image count
    (None and 0 when there is nothing it did not see)."""
    if not items:
        return None, 0
    logits, _, labels = evaluator.read(list(items), image_shape)
    n = len(labels)
    return (int((logits.argmax(1) == labels).sum()) / n if n else None), n


def check_evaluator(evaluator, evaluation, targets, data, image_shape, *, allow_weak: bool = False,
                    gate: bool = False) -> tuple[dict, list[str]]:  # fmt: skip
    """All evaluator checks; returns the report's `eval_model.trust` record and warnings.

    Refuses permuted or other classes, the target as its own evaluator, an evaluator that saw every
    validation image (its accuracy could only be measured on images it learnt), an accuracy whose
    Wilson interval reaches below `accuracy_floor` (unless `allow_weak`, which then only warns: the
    caller forbids a gate) and, with `gate`, an evaluator trained on other images than the audited
    ones. The accuracy is measured on the validation images the evaluator did not train on
    (`unseen_validation`).
    """
    recorded = evaluation.provenance
    classes_match = check_classes(recorded.get("classes"), data.classes, evaluation.name)
    check_not_target(evaluation, targets)
    items, relation, fingerprint_match = unseen_validation(evaluation, data)
    accuracy, n = evaluator_accuracy(evaluator, items, image_shape)
    floor = accuracy_floor(data.num_classes)
    warnings = []
    if classes_match is None:
        warnings.append(f"the evaluation model {evaluation.name} records no class names, so its class order is unchecked; "
                        "models from mishield train-eval record them.")
    low = None if accuracy is None else wilson_interval(round(accuracy * n), n)[0]
    if not data.val:
        warnings.append("the private data has no validation images, so the evaluation model's accuracy is unmeasured; "
                        "add a val/ folder to trust the audit.")
    elif accuracy is None:
        sentence = (f"the evaluation model {evaluation.name} was trained on every one of the {len(data.val)} private validation "
                    "images, so its accuracy can only be measured on images it learnt, which says nothing; retrain it with "
                    "mishield train-eval, which holds out the images the audit validates on.")
        if not allow_weak:
            raise BadInputError(sentence)
        warnings.append(sentence)
    elif low < floor:
        sentence = (f"the evaluation model {evaluation.name} recognises {100 * accuracy:.1f} % of the {n} private validation "
                    f"images at the attack's {image_shape[1]}x{image_shape[2]} px (95 % interval from {100 * low:.1f} %), "
                    f"which may be below the floor of {100 * floor:.1f} % (chance {100 * chance_level(data.num_classes):.1f} %), "
                    "so its attack accuracy could say nothing; train it longer or at the prior's resolution "
                    "(mishield train-eval --prior), or add validation images to narrow the interval.")
        if not allow_weak:
            raise BadInputError(sentence)
        warnings.append(sentence)
    fingerprint = (recorded.get("training") or {}).get("data_fingerprint")
    if relation == "other images":
        sentence = (f"the evaluation model {evaluation.name} was trained on other images than the private training images "
                    f"audited here ({fingerprint.get('images')} recorded, {len(data.train)} here; data fingerprints differ)")
        if gate:
            raise BadInputError(f"{sentence}, and a gate must not rest on a judge of other data; train it on this data "
                                "(mishield train-eval) and gate again.")
        warnings.append(f"{sentence}; its accuracy was measured above, but train it on this data (mishield train-eval) "
                        "for a like-for-like judge (a gate refuses it).")
    record = {"accuracy": accuracy, "accuracy_n": n, "accuracy_low": low, "floor": floor, "chance": chance_level(data.num_classes),
              "resolution": list(image_shape[1:]), "classes_match": classes_match,
              "recorded_accuracy": (recorded.get("metrics") or {}).get("natural_acc"),
              "fingerprint": fingerprint, "fingerprint_match": fingerprint_match, "training_data": relation}
    warnings += _resolution_warning(evaluation, image_shape)
    return record, warnings


# How an evaluator's training images relate to the audit's private data (`unseen_validation`).
TRAINING_RELATIONS = ("same split", "other split", "same images", "every image", "other images", "unknown")


def unseen_validation(evaluation, data) -> tuple[list, str, bool | None]:
    """The private validation images `evaluation` did not train on, how its training images relate to
    `data` (one of TRAINING_RELATIONS) and whether they are exactly `data.train` (None: unrecorded).

    An evaluator from `mishield train-eval` on a folder without val/ records its hold-out
    (`training.split`): on the same folder the audit redraws it, so even a hold-out of another share
    or seed is known image by image ("same split" / "other split"). Otherwise its fingerprint tells:
    `data.train` ("same images"), `data.train` and `data.val` together ("every image": nothing is left
    to measure on), or neither ("other images", "unknown" when nothing is recorded; then all of
    `data.val` is used, as nothing says which images it saw).
    """
    from mishield.data import DataSplits, data_fingerprint, hold_out
    from mishield.training.state import data_signature

    training = evaluation.provenance.get("training") or {}
    split, fingerprint = training.get("split") or {}, training.get("data_fingerprint")
    every = sorted(data.train + data.val)
    if "val_fraction" in split and split.get("signature") == data_signature(every):
        own = set(hold_out(DataSplits(every, [], data.classes), float(split["val_fraction"]), int(split["seed"])).val)
        items = [item for item in data.val if item in own]
        same = own == set(data.val)
        return items, "same split" if same else "other split", same
    if not isinstance(fingerprint, dict) or "sha256" not in fingerprint:
        return list(data.val), "unknown", None
    if data_fingerprint(data.train, data.classes)[0]["sha256"] == fingerprint["sha256"]:
        return list(data.val), "same images", True
    if data.val and data_fingerprint(every, data.classes)[0]["sha256"] == fingerprint["sha256"]:
        return [], "every image", False
    return list(data.val), "other images", False


def _resolution_warning(evaluation, image_shape) -> list[str]:
    size = max(int(v) for v in evaluation.preprocessing.input_size[1:])
    prior_size = max(int(v) for v in image_shape[1:])
    if max(size, prior_size) <= 2 * min(size, prior_size):
        return []
    warning = (f"the evaluation model reads {size} px images but the prior makes {prior_size} px ones; the private images go "
               f"through the same {prior_size} px degradation for accuracy and KNN distance, but an evaluator trained at the "
               "prior's resolution judges better (mishield train-eval --prior).")
    return [warning]


def check_target_for_gate(name: str, natural_acc: float | None, n: int, num_classes: int) -> None:
    """Refuse to gate a target whose natural accuracy interval reaches down to chance (or is unmeasured)."""
    if natural_acc is None or n == 0:
        raise BadInputError(
            f"{name} cannot be gated: the private data has no validation images to show it learned anything, and a failed "
            "attack on a model that learned nothing looks like privacy; add a val/ folder."
        )
    low, _ = wilson_interval(round(natural_acc * n), n)
    if low <= chance_level(num_classes):
        raise BadInputError(
            f"{name} cannot be gated: its natural accuracy {100 * natural_acc:.1f} % (95 % interval from {100 * low:.1f} %, "
            f"{n} images) does not rise above chance ({100 * chance_level(num_classes):.1f} %), so a failed attack would look like "
            "privacy; check its mean/std, input size and class order."
        )


# What a model whose forward is code is, by its loaded kind (mishield.models.LoadedModel.kind).
PROGRAMS = {"torchscript": "a TorchScript archive", "exported": "a torch.export program", "pickled_module": "a pickled module"}


def program_kind(info: dict) -> str | None:
    """What makes an audited model's forward a program of its owner's choosing, in words, or None.

    TorchScript, torch.export programs and pickled modules carry their forward as code; an
    architecture built by a `package.module:factory` runs whatever module that is. Such a forward
    can switch behaviour on generated inputs, which an attacker holding the weights simply removes
    (issue 20); registry architectures (`timm:`, `torchvision:`) and mishield's own do not."""
    from mishield.models.filechecks import builds_only_a_network

    if info.get("kind") in PROGRAMS:
        return PROGRAMS[info["kind"]]
    arch = info.get("arch")
    if isinstance(arch, str) and ":" in arch and not builds_only_a_network(arch):
        return f"built by the factory {arch}"
    return None


def check_programs_for_gate(targets, trust_checkpoint: bool) -> None:
    """Refuse to gate a program without `--trust-checkpoint`: its figures cover its code, not its weights."""
    for t in targets:
        what = program_kind(t.info)
        if what is not None and not trust_checkpoint:
            from mishield.errors import UsageError

            raise UsageError(
                f"{t.name} is {what}, whose forward is code that could answer the attack's generated images differently "
                "from natural ones; a gate on it covers that code only, so pass --trust-checkpoint to confirm you gate the "
                "program as it is, or audit its weights with a registry architecture (--arch timm:NAME)."
            )


def program_note(verdict: dict, info: dict) -> dict:
    """The verdict with `program` set and the reason saying what the figures cover, for a program."""
    what = program_kind(info)
    if what is None:
        return {**verdict, "program": False}
    return {**verdict, "program": True,
            "reason": f"{verdict['reason']} The figures cover the program's behaviour only: the model is {what}, whose forward "
                      "could treat generated images differently; an attacker holding its weights would run them without it."}  # fmt: skip


def check_prior_overlap(prior_file: str | Path | None, data) -> dict:
    """Refuse private images that are among the prior's training images; returns the provenance record."""
    from mishield.models.dcgan import read_prior_hashes

    hashes = read_prior_hashes(Path(prior_file)) if prior_file is not None and Path(str(prior_file)).is_file() else None
    if hashes is None:
        return {"checked": False}
    from mishield.data import item_hashes

    items = list(data.train) + list(data.val)
    known = set(hashes.tolist())
    overlap = [path for (path, _), h in zip(items, item_hashes(items)) if h in known]
    if overlap:
        raise BadInputError(
            f"{len(overlap)} of the {len(items)} private images (e.g. {overlap[0]}) are among the prior's training images, so "
            "the attack would recall them rather than reconstruct them; train the prior on public data disjoint from the private data."
        )
    return {"checked": True, "prior_images": int(hashes.numel()), "private_images": len(items), "overlap": 0}


# A prior whose samples lie this many times farther (in the evaluator's features) from the private
# validation images than the private training images do draws blobs, not data: the audit says so.
# Measured on class-disjoint Fashion-MNIST (docs/audit.md "Trust checks"): untrained 10.6, 1 epoch
# 8.4 (grey texture), 3 epochs 5.4 (blobs), 10 epochs 4.2 (recognisable shapes), 20 epochs 3.1.
PRIOR_WEAK_RATIO = 5.0


@torch.no_grad()
def prior_quality(prior, evaluator, data, *, n: int = 256, seed: int = 0, max_private: int = 512) -> dict | None:
    """A measured quality figure of a generator prior, in the evaluation model's feature space.

    `nn_ratio`: the median distance from a private validation image to its nearest of `n` prior
    samples, over its distance to its nearest private training image (both degraded to the
    prior's resolution). Near 1: the prior's random samples already look like private data to
    the evaluator; large: its images lie far from anything real (a prior of grey blobs), and
    the attack must travel far — or cannot. Also the evaluator's mean top-1 probability on the
    samples and how many private classes it assigns at least one sample to. None for the pixel prior.
    """
    if prior is None or prior.kind == "pixels" or not data.val:
        return None
    from mishield.attack.engine import chunks

    device = evaluator.runtime.device
    prior.to(device)
    rng = torch.Generator().manual_seed(seed)
    latents = prior.sample(n, rng, device)
    images = torch.cat([((prior.generate(latents[p]).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
                        for p in chunks(n, evaluator.batch_size)])
    logits, sample_feats = evaluator.images(images)
    val_feats = _features(evaluator, _spread(data.val, max_private), prior.image_shape)
    train_feats = _features(evaluator, _spread(data.train, 2 * max_private), prior.image_shape)
    to_prior = torch.cdist(val_feats, sample_feats).min(1).values.median()
    to_real = torch.cdist(val_feats, train_feats).min(1).values.median()
    probs = logits.softmax(1)
    ratio = float(to_prior / to_real) if to_real > 0 else float("inf")
    return {"samples": n, "nn_ratio": ratio, "weak_ratio": PRIOR_WEAK_RATIO,
            "evaluator_confidence": float(probs.max(1).values.mean()),
            "classes_reached": int(probs.argmax(1).unique().numel()), "weak": ratio > PRIOR_WEAK_RATIO}


def _spread(items: Sequence, k: int) -> list:
    step = max(1, len(items) // k)
    return list(items)[::step][:k]


def _features(evaluator, items: Sequence, image_shape) -> torch.Tensor:
    return torch.cat([evaluator.images(x)[1] for x, _ in degraded_batches(items, image_shape, evaluator.batch_size)])


def weak_prior_warning(quality: dict) -> str:
    return (f"the prior looks too weak for a meaningful audit: its samples lie {quality['nn_ratio']:.1f}x farther from the "
            f"private validation images than the private training images do (in the evaluation model's features; over "
            f"{quality['weak_ratio']:.0f}x is weak), so a low attack accuracy may only mean the prior cannot draw the data; "
            "train the prior longer or on closer public data and look at its samples (PRIOR.samples.png).")
