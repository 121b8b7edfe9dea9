"""The defences that change the loss or the data, each pinned to its definition and to its effect:
negative label smoothing (Struppek et al., ICLR 2024), random erasing (MIDRE, TMLR 2025) and
partial freezing (TL-DMI, Ho et al., CVPR 2024), alone and stacked with BiDO and RoLSS.

Every effect test compares against the same run with the defence off (or its sign flipped), on
the embedded Fashion-MNIST images, so switching a defence off or flipping its sign fails it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from attack_support import tiny_resnet
from torch import nn

from mishield.data import (
    DataSplits,
    ImageDataset,
    eval_transform,
    load_embedded_fashion_mnist,
    load_image_folders,
    train_transform,
)
from mishield.errors import BadInputError, UsageError
from mishield.models import load_model, save_model
from mishield.preprocessing import Preprocessing
from mishield.runtime import make_runtime
from mishield.surgery import plan_surgery
from mishield.training import (
    MIDRE_ERASE,
    BiDOConfig,
    LabelSmoothing,
    RunOptions,
    TrainingInterrupted,
    TrainingRecipe,
    TrainStep,
    evaluate_accuracy,
    fit,
    load_state,
    loop,
    plan_freeze,
    pretrain_on_public,
    run_schedule,
    smoothed_cross_entropy,
    smoothing_factor,
    train_tl_dmi,
)

PRE = Preprocessing((3, 16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# What TrainingRecipe.to_dict() recorded before the defences existed: a recipe without them must
# record (and fingerprint for --resume) exactly this, or states of older runs stop resuming.
PRE_DEFENCE_KEYS = {"schedule", "epochs", "stage1_epochs", "lr", "betas", "milestones", "gamma", "batch_size",
                    "seed", "bido"}


def _take(items, keep: dict[int, int], n: int):
    out, count = [], {}
    for path, label in items:
        if label in keep and count.get(label, 0) < n:
            count[label] = count.get(label, 0) + 1
            out.append((path, keep[label]))
    return out


def _subset(fmnist_dir: Path, classes: list[int], train: int, val: int) -> DataSplits:
    full = load_image_folders(fmnist_dir)
    keep = {c: i for i, c in enumerate(classes)}
    return DataSplits(_take(full.train, keep, train), _take(full.val, keep, val), [full.classes[c] for c in classes])


@pytest.fixture(scope="module")
def small(fmnist_dir) -> DataSplits:
    return _subset(fmnist_dir, [0, 1, 7], 32, 8)  # t-shirt, trouser, sneaker


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Label smoothing: the schedule, the loss, and its effect on the wrong-class logits


@pytest.mark.parametrize(("epoch", "expected"), [(0, 0.0), (1, 0.0), (2, 0.0), (3, -0.025), (4, -0.05), (9, -0.05)])
def test_smoothing_factor_is_zero_before_its_start_then_ramps_linearly(epoch, expected):
    assert smoothing_factor(-0.05, 3, 2, epoch) == pytest.approx(expected)


def test_smoothing_schedule_defaults_resolve_to_whole_epochs_and_are_recorded():
    assert smoothing_factor(-0.05, 3, 0, 3) == smoothing_factor(-0.05, 3, 1, 3) == -0.05  # no ramp: at once
    recipe = TrainingRecipe("finetune", epochs=10, label_smoothing=-0.05)
    assert recipe.label_smoothing == LabelSmoothing(-0.05, start_epoch=5, ramp_epochs=2)  # half the run, then a quarter
    assert recipe.to_dict()["label_smoothing"] == {"alpha": -0.05, "start_epoch": 5, "ramp_epochs": 2}
    tts = TrainingRecipe("tts", epochs=95, stage1_epochs=5, label_smoothing=LabelSmoothing(-0.05, start_epoch=10))
    assert tts.label_smoothing == LabelSmoothing(-0.05, 10, 25)  # global epochs over both TTS stages


@pytest.mark.parametrize("alpha", [-0.05, -0.3, 0.0, 0.1])
def test_smoothed_loss_equals_the_definition(alpha):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 7, generator=g) * 3
    labels = torch.randint(0, 7, (16,), generator=g)
    target = (1 - alpha) * F.one_hot(labels, 7).float() + alpha / 7
    direct = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(smoothed_cross_entropy(logits, labels, alpha), direct)
    if alpha >= 0:  # torch's own definition, where torch accepts the factor
        torch.testing.assert_close(smoothed_cross_entropy(logits, labels, alpha),
                                   F.cross_entropy(logits, labels, label_smoothing=alpha))
    if alpha < 0:  # the point of the defence: wrong classes get negative targets
        assert (target[F.one_hot(labels, 7) == 0] < 0).all()


def _fmnist_tensors():
    fm = load_embedded_fashion_mnist()

    def prep(images, labels, step, n):
        return torch.from_numpy(images[::step][:n]).float()[:, None] / 127.5 - 1.0, torch.from_numpy(labels[::step][:n]).long()

    return prep(fm.train_images, fm.train_labels, 3, 1000), prep(fm.test_images, fm.test_labels, 4, 200)


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))  # fmt: skip


def _train_cnn(smoothing: LabelSmoothing | None, epochs: int, epoch_of_step: int = 0) -> nn.Module:
    model = _tiny_cnn()
    step = TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-3), make_runtime("cpu"), num_classes=10,
                     label_smoothing=smoothing)
    step.epoch = epoch_of_step
    (x, y), _ = _fmnist_tensors()
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            step(x[order[i : i + 64]], y[order[i : i + 64]])
    return model.eval()


def _mean_wrong_class_log_prob(model: nn.Module) -> float:
    _, (x, y) = _fmnist_tensors()
    with torch.no_grad():
        log_p = F.log_softmax(model(x), 1)
    return log_p[F.one_hot(y, 10) == 0].mean().item()


def test_negative_smoothing_pushes_wrong_classes_below_plain_ce_and_positive_above():
    """Held-out images after 4 epochs (measured: plain CE -6.1, alpha -0.05 -7.1, alpha +0.1 -4.4)."""
    plain = _mean_wrong_class_log_prob(_train_cnn(None, 4))
    negative = _mean_wrong_class_log_prob(_train_cnn(LabelSmoothing(-0.05, 0, 0), 4))
    positive = _mean_wrong_class_log_prob(_train_cnn(LabelSmoothing(0.1, 0, 0), 4))
    assert negative < plain - 0.5, (negative, plain)
    assert positive > plain + 0.5, (positive, plain)


def test_before_its_start_label_smoothing_is_plain_ce_bit_for_bit():
    plain = _train_cnn(None, 1).state_dict()
    waiting = _train_cnn(LabelSmoothing(-0.05, start_epoch=3, ramp_epochs=1), 1, epoch_of_step=2).state_dict()
    started = _train_cnn(LabelSmoothing(-0.05, start_epoch=3, ramp_epochs=1), 1, epoch_of_step=3).state_dict()
    assert all(torch.equal(plain[k], waiting[k]) for k in plain)
    assert not all(torch.equal(plain[k], started[k]) for k in plain)


def test_the_loop_applies_the_schedule_per_epoch_and_records_it(small):
    torch.manual_seed(0)
    result = fit(tiny_resnet(3), small, PRE, epochs=4, batch_size=16, device="cpu", workers=0, label_smoothing=-0.05)
    assert [h["label_smoothing"] for h in result.history] == [0.0, 0.0, -0.05, -0.05]  # start 2, ramp 1
    torch.manual_seed(0)
    plain = fit(tiny_resnet(3), small, PRE, epochs=4, batch_size=16, device="cpu", workers=0)
    # the first two (factor 0) epochs are plain CE, bit for bit; the later ones are not
    losses = [h["train_loss"] for h in result.history], [h["train_loss"] for h in plain.history]
    assert losses[0][:2] == losses[1][:2] and all(a != b for a, b in zip(losses[0][2:], losses[1][2:]))
    assert plain.history[-1]["label_smoothing"] is None


# ---------------------------------------------------------------------------------------------
# Random erasing: training batches only, one rectangle of the normalisation mean per image


def _erased_fraction(image: torch.Tensor) -> float | None:
    """The area fraction of the all-zero rectangle in a normalised image (None when there is none).

    The unerased pixels are never exactly 0: with mean 0.5 and std 0.5 that would need the 8-bit
    value 127.5."""
    zero = (image == 0).all(dim=0)
    if not zero.any():
        return None
    rows, cols = zero.any(dim=1).nonzero().flatten(), zero.any(dim=0).nonzero().flatten()
    box = zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all(), "the erased pixels form one filled rectangle"
    return box.numel() / zero.numel()


def _captured_batches(monkeypatch, data, **kw):
    seen: list[torch.Tensor] = []
    original = loop.TrainStep.__call__

    def recording(self, x, y):
        seen.append(x.clone())
        return original(self, x, y)

    monkeypatch.setattr(loop.TrainStep, "__call__", recording)
    torch.manual_seed(0)
    result = fit(tiny_resnet(3), data, PRE, epochs=1, batch_size=16, device="cpu", workers=0, **kw)
    monkeypatch.setattr(loop.TrainStep, "__call__", original)
    return seen, result


def test_erasing_erases_every_training_image_within_the_area_bounds(monkeypatch, small):
    plain, _ = _captured_batches(monkeypatch, small)
    erased, result = _captured_batches(monkeypatch, small, erase=MIDRE_ERASE)
    assert all(_erased_fraction(img) is None for batch in plain for img in batch)  # nothing erased when off
    fractions = [_erased_fraction(img) for batch in erased for img in batch]
    assert None not in fractions  # p = 1: every image
    # 16 x 16 pixels: the rectangle's sides are rounded to whole pixels, hence the tolerance
    assert min(fractions) >= 0.1 - 0.04 and max(fractions) <= 0.8 + 0.04, (min(fractions), max(fractions))
    assert max(fractions) - min(fractions) > 0.3  # the area is drawn, not fixed
    # evaluation never erases: the loop's validation accuracy is the deterministic one
    assert result.history[-1]["val_acc"] == evaluate_accuracy(result.model, small.val, PRE, device="cpu", workers=0)
    x = torch.stack([ImageDataset(small.val, eval_transform(PRE))[i][0] for i in range(len(small.val))])
    assert all(_erased_fraction(img) is None for img in x)


def test_erasing_is_part_of_the_training_transform_only(small):
    from PIL import Image

    with Image.open(small.train[0][0]) as img:
        image = img.convert("RGB")
    for seed in range(5):  # the erasing comes last: outside its rectangle the plain augmentation's pixels
        torch.manual_seed(seed)
        plain = train_transform(PRE)(image)
        torch.manual_seed(seed)
        erased = train_transform(PRE, erase=MIDRE_ERASE)(image)
        keep = (erased != 0).all(dim=0)
        assert torch.equal(plain[:, keep], erased[:, keep]) and 0.06 <= _erased_fraction(erased) <= 0.84
    tf = train_transform(PRE, erase=(0.5, 0.2, 0.4))
    eraser = tf.transforms[-1]
    assert isinstance(eraser, torchvision.transforms.RandomErasing)
    assert (eraser.p, eraser.scale, eraser.ratio, eraser.value) == (0.5, (0.2, 0.4), (0.3, 3.3), 0.0)
    assert not any(isinstance(t, torchvision.transforms.RandomErasing) for t in train_transform(PRE).transforms)
    assert not any(isinstance(t, torchvision.transforms.RandomErasing) for t in eval_transform(PRE).transforms)


# ---------------------------------------------------------------------------------------------
# Partial freezing: the stem and the first stages, batch-norm statistics included


def test_freeze_plan_finds_the_declared_stem_and_stages_of_a_torchvision_resnet():
    model = torchvision.models.resnet18(num_classes=3)
    plan = plan_freeze(model, torch.zeros(2, 3, 32, 32), 2)
    assert plan.stem == "relu" and plan.stage_points == ("layer1", "layer2", "layer3", "layer4")
    tops = {name.split(".")[0] for name in plan.parameters}
    assert tops == {"conv1", "bn1", "layer1", "layer2"}
    assert all(name.split(".")[0] in tops for name in plan.buffers)
    assert "layer2.0.downsample.1.running_var" in plan.buffers


def test_freeze_plan_places_root_parameters_by_their_first_use():
    """ViT's class token and position embedding live on the root module; they are used before the first block."""
    loaded = load_model("timm:test_vit", num_classes=3, input_size=32)
    plan = plan_freeze(loaded.model, torch.zeros(2, *loaded.preprocessing.input_size), 1)
    assert plan.stem is None and plan.boundary == "blocks.0"
    assert {"cls_token", "pos_embed"} <= set(plan.parameters)
    assert not any(n.startswith("blocks.1.") for n in plan.parameters)


def _norm_buffers(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """Every buffer (num_batches_tracked included) of the norm layers whose running mean is frozen."""
    frozen = set(names)
    return {f"{m}.{b}": t.clone() for m, mod in model.named_modules() if f"{m}.running_mean" in frozen
            for b, t in mod.named_buffers(recurse=False)}


@pytest.mark.parametrize("freeze", [0, 2], ids=["off", "two-stages"])
def test_freezing_leaves_the_stem_and_first_stages_bit_identical(small, freeze):
    torch.manual_seed(0)
    model = tiny_resnet(3)
    plan = plan_freeze(model, torch.zeros(2, *PRE.input_size), 2)  # what freeze_stages=2 freezes
    before, norms_before = _snapshot(model), _norm_buffers(model, plan.buffers)
    result = fit(model, small, PRE, epochs=2, batch_size=16, device="cpu", workers=0, freeze_stages=freeze)
    after = result.model.state_dict()
    frozen_params = list(plan.parameters)
    assert len(frozen_params) > 5 and len(norms_before) >= 4
    unchanged = [n for n in frozen_params if torch.equal(before[n], after[n])]
    stats_unchanged = [n for n, t in _norm_buffers(result.model, plan.buffers).items() if torch.equal(norms_before[n], t)]
    later = [n for n in after if n not in plan.parameters and n not in plan.buffers and "num_batches" not in n]
    assert all(not torch.equal(before[n], after[n]) for n in later)  # the later stages and the head learn
    if freeze:
        assert unchanged == frozen_params and sorted(stats_unchanged) == sorted(norms_before)
        assert all(p.requires_grad for p in result.model.parameters())  # released after training
    else:
        assert not unchanged and not stats_unchanged  # the same layers move when nothing is frozen


def test_freezing_holds_in_both_tts_stages_across_rolss_surgery(small, tmp_path):
    torch.manual_seed(0)
    model = tiny_resnet(3)
    plan = plan_freeze(model, torch.zeros(2, *PRE.input_size), 2)
    before = _snapshot(model)
    surgery = plan_surgery(model, "rolss", input_size=PRE.input_size)
    recipe = TrainingRecipe("tts", epochs=1, stage1_epochs=1, batch_size=16, freeze_stages=2)
    log = tmp_path / "train.jsonl"
    result = run_schedule(model, surgery, small, PRE, recipe, device="cpu", workers=0, log_path=log)
    after = result.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in plan.parameters + plan.buffers)
    assert not torch.equal(before["9.weight"], after["9.weight"])  # the head learned
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["stage"] for e in events if e["event"] == "freeze"] == ["stage1", "stage2"]
    assert result.training_record()["freeze_stages"] == 2


def test_what_is_frozen_is_decided_before_surgery(fmnist_dir):
    """ConvNeXt's stage 2 opens with a LayerNorm2d that its RoLSS rewrite runs inline: judged on the
    rewritten model it would sit before the cut; judged on the model as loaded (as `run_schedule`
    does) it belongs to stage 2 and trains."""
    data = _subset(fmnist_dir, [0, 1, 7], 8, 2)
    torch.manual_seed(0)
    loaded = load_model("timm:test_convnext", num_classes=3, input_size=32)
    pre = loaded.preprocessing
    before = _snapshot(loaded.model)
    surgery = plan_surgery(loaded.model, "rolss", input_size=pre.input_size)
    recipe = TrainingRecipe("finetune", epochs=1, batch_size=12, freeze_stages=1)
    result = run_schedule(loaded.model, surgery, data, pre, recipe, device="cpu", workers=0)
    after = result.model.state_dict()
    assert torch.equal(before["stages.0.blocks.0.conv_dw.weight"], after["stages.0.blocks.0.conv_dw.weight"])
    assert not torch.equal(before["stages.1.downsample.0.weight"], after["stages.1.downsample.0.weight"])


def test_freezing_refuses_more_stages_than_the_model_has_and_models_without_stages():
    with pytest.raises(UsageError, match="`freeze_stages` is 5 but Sequential has 4 stage"):
        plan_freeze(tiny_resnet(3), torch.zeros(2, *PRE.input_size), 5)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(BadInputError, match="found no stages in Sequential to freeze") as info:
        plan_freeze(mlp, torch.zeros(2, *PRE.input_size), 1)
    assert "`freeze_stages`" in str(info.value)


# ---------------------------------------------------------------------------------------------
# TL-DMI: public pre-training, then the first stages frozen for the private data


def test_tl_dmi_keeps_the_public_early_stages_and_trains_the_rest_privately(fmnist_dir, tmp_path):
    public = _subset(fmnist_dir, [5, 6, 8, 9], 24, 8)
    private = _subset(fmnist_dir, [0, 1, 7], 24, 8)
    torch.manual_seed(0)
    model = tiny_resnet(10)
    initial = _snapshot(model)
    state = tmp_path / "tl.train-state"
    result = train_tl_dmi(model, public, private, PRE, TrainingRecipe("finetune", epochs=2, batch_size=16, freeze_stages=2),
                          public_epochs=2, options=RunOptions(device="cpu", workers=0, state_path=state))
    after = result.model.state_dict()
    public_weights = load_state(state.with_name(state.name + ".public"))["model"]
    plan = plan_freeze(tiny_resnet(3), torch.zeros(2, *PRE.input_size), 2)
    assert result.model[-1].out_features == 3  # the private head
    for n in plan.parameters + plan.buffers:
        assert torch.equal(after[n], public_weights[n]), n  # exactly what the public data left
    assert not torch.equal(initial["0.weight"], public_weights["0.weight"])  # ... which did learn
    later = "6.conv1.weight"
    assert not torch.equal(after[later], public_weights[later])  # the later stages learned privately
    assert result.pretraining.public_accuracy > 1 / 4 and result.to_dict()["freeze_stages"] == 2
    assert load_state(state)["recipe"]["freeze_stages"] == 2


def test_pretrain_on_public_validates_its_counts(small):
    with pytest.raises(UsageError, match="`epochs`"):
        pretrain_on_public(tiny_resnet(3), small, PRE, TrainingRecipe("finetune", epochs=0), private_classes=3)
    with pytest.raises(UsageError, match="`freeze_stages`"):
        train_tl_dmi(tiny_resnet(3), small, small, PRE, TrainingRecipe("finetune", epochs=1), public_epochs=1)


# ---------------------------------------------------------------------------------------------
# Stacking, recording, validation, old recipes


def test_all_three_stack_with_bido_and_rolss_in_one_run_and_are_recorded(small, tmp_path):
    torch.manual_seed(0)
    model = tiny_resnet(3)
    plan = plan_freeze(model, torch.zeros(2, *PRE.input_size), 1)
    before = _snapshot(model)
    surgery = plan_surgery(model, "rolss", input_size=PRE.input_size)
    recipe = TrainingRecipe("tts", epochs=2, stage1_epochs=1, batch_size=16, bido=BiDOConfig(),
                            label_smoothing=LabelSmoothing(-0.05, start_epoch=1, ramp_epochs=1),
                            erase=MIDRE_ERASE, freeze_stages=1)
    log = tmp_path / "train.jsonl"
    result = run_schedule(model, surgery, small, PRE, recipe, device="cpu", workers=0, log_path=log,
                          state_path=tmp_path / "state")
    history = result.history
    assert [h["label_smoothing"] for h in history] == [0.0, -0.05, -0.05]
    assert all(h["hsic_x"] is not None and torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    after = result.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in plan.parameters)
    start = json.loads(log.read_text().splitlines()[0])
    expected = {"label_smoothing": {"alpha": -0.05, "start_epoch": 1, "ramp_epochs": 1}, "erase": [1.0, 0.1, 0.8],
                "freeze_stages": 1}
    assert start["event"] == "start" and expected.items() <= start["recipe"].items()
    assert start["recipe"]["bido"]["lx"] == 0.05
    out = tmp_path / "hardened.pt"
    save_model(out, result.model, arch="attack_support:tiny_resnet", num_classes=3, surgery=result.surgery.spec,
               preprocessing=PRE, extra={"training": result.training_record()})
    assert expected.items() <= load_model(out, arch="attack_support:tiny_resnet").recipe["training"].items()


@pytest.mark.parametrize(("fields", "words"), [
    ({"erase": (1.5, 0.1, 0.8)}, "`erase` probability"),
    ({"erase": (1.0, 0.5, 0.2)}, "`erase` areas"),
    ({"erase": (1.0, 0.1, 1.0)}, "`erase` areas"),
    ({"erase": "1,2"}, "`erase` must be three numbers"),
    ({"label_smoothing": "-0.05"}, "`label_smoothing` must be"),
    ({"freeze_stages": -1}, "`freeze_stages`"),
    ({"freeze_stages": True}, "`freeze_stages`"),
    ({"freeze_stages": 1.5}, "`freeze_stages`"),
])  # fmt: skip
def test_bad_defence_values_are_usage_errors_naming_the_field(fields, words):
    with pytest.raises(UsageError, match=words):
        TrainingRecipe("finetune", epochs=4, **fields)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"alpha": 1.0}, "alpha must be a number strictly between -1 and 1"),
    ({"alpha": float("nan")}, "alpha"),
    ({"alpha": -0.05, "start_epoch": -1}, "start_epoch"),
    ({"alpha": -0.05, "ramp_epochs": 2.5}, "ramp_epochs"),
])  # fmt: skip
def test_bad_label_smoothing_values_are_usage_errors(kwargs, words):
    with pytest.raises(UsageError, match=f"`label_smoothing`.*{words}"):
        LabelSmoothing(**kwargs)


def test_a_recipe_without_the_new_defences_records_what_it_did_before():
    assert set(TrainingRecipe().to_dict()) == PRE_DEFENCE_KEYS
    assert set(TrainingRecipe(erase=MIDRE_ERASE, freeze_stages=2, label_smoothing=-0.05).to_dict()) == (
        PRE_DEFENCE_KEYS | {"erase", "freeze_stages", "label_smoothing"})


def test_a_state_resumes_only_with_the_same_defences(small, tmp_path):
    state = tmp_path / "run.train-state"

    def run(**kw):
        torch.manual_seed(0)
        return fit(tiny_resnet(3), small, PRE, epochs=2, batch_size=16, device="cpu", workers=0,
                   state_path=state, **kw)

    with pytest.raises(TrainingInterrupted):
        run(erase=MIDRE_ERASE, stop_after=1)
    assert "erase" in load_state(state)["fingerprint"]["recipe"]
    with pytest.raises(BadInputError, match="different run"):
        run(resume=True)  # erasing switched off
    with pytest.raises(BadInputError, match="different run"):
        run(resume=True, erase=(1.0, 0.1, 0.5))
    result = run(resume=True, erase=MIDRE_ERASE)
    assert result.resumed_from_epoch == 1 and [h["epoch"] for h in result.history] == [1, 2]


def test_label_smoothing_cannot_replace_a_custom_criterion():
    model = _tiny_cnn()
    with pytest.raises(UsageError, match="`label_smoothing`"):
        TrainStep(model, torch.optim.Adam(model.parameters()), make_runtime("cpu"), num_classes=10,
                  criterion=lambda z, x, y: (z.sum(), y), label_smoothing=LabelSmoothing(-0.05, 0, 0))


def test_gaussian_noise_is_added_in_pixel_units_before_normalisation_and_recorded_only_when_on(small):
    from PIL import Image

    from mishield.data import GaussianNoise
    from mishield.training import TrainingRecipe

    with Image.open(small.train[0][0]) as img:
        image = img.convert("RGB")
    steps = train_transform(PRE, noise=0.25).transforms
    assert isinstance(steps[-2], GaussianNoise) and isinstance(steps[-1], torchvision.transforms.Normalize)
    assert not any(isinstance(t, GaussianNoise) for t in train_transform(PRE).transforms + eval_transform(PRE).transforms)
    torch.manual_seed(3)
    plain = train_transform(PRE)(image)
    torch.manual_seed(3)
    noisy = train_transform(PRE, noise=0.25)(image)
    # the noise is drawn after the photo augmentation's draws: the difference is pure noise, scaled by 1/std
    diff = (noisy - plain) * torch.tensor(PRE.std).view(-1, 1, 1)
    assert abs(float(diff.std()) - 0.25) < 0.02 and abs(float(diff.mean())) < 0.02
    assert TrainingRecipe(noise=0.25).to_dict()["noise"] == 0.25 and "noise" not in TrainingRecipe().to_dict()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UsageError, match="`noise`"):
            TrainingRecipe(noise=bad)
