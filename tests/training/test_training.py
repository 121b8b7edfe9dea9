"""Fine-tuning on real images (the embedded Fashion-MNIST subset): TTS, BiDO, resume, divergence, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clirun import run_cli as _cli
from torch import nn

from mishield.data import DataSplits, ImageDataset, eval_transform, load_image_folders
from mishield.errors import BadInputError, UsageError
from mishield.models import load_model, save_model
from mishield.preprocessing import Preprocessing
from mishield.surgery import plan_surgery
from mishield.training import (
    BiDOConfig,
    TrainingDiverged,
    TrainingInterrupted,
    TrainingRecipe,
    evaluate_accuracy,
    fit,
    load_state,
    reset_head,
    run_schedule,
)

ARCH = "timm:test_resnet"  # timm's own tiny ResNet (0.37 M parameters): real skips, real stages
CLASSES = 3


def _subset(fmnist_dir: Path, per_class_train: int, per_class_val: int) -> DataSplits:
    """A few classes of the shared ImageFolder fixture, without copying files."""
    full = load_image_folders(fmnist_dir)
    keep = {0: 0, 1: 1, 7: 2}  # t-shirt, trouser, sneaker

    def take(items, n):
        out, count = [], {}
        for path, label in items:
            if label in keep and count.get(label, 0) < n:
                count[label] = count.get(label, 0) + 1
                out.append((path, keep[label]))
        return out

    return DataSplits(take(full.train, per_class_train), take(full.val, per_class_val),
                      [full.classes[c] for c in keep])


@pytest.fixture(scope="module")
def small(fmnist_dir) -> DataSplits:
    return _subset(fmnist_dir, 48, 16)


def _model():
    loaded = load_model(ARCH, num_classes=CLASSES, input_size=48)
    return loaded


def _ce_on(model: nn.Module, items, pre: Preprocessing) -> float:
    ds = ImageDataset(items, eval_transform(pre))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([label for _, label in items])
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("bido", [False, True], ids=["plain", "bido"])
def test_tts_lowers_the_loss_and_writes_a_model_that_loads(small, tmp_path, bido):
    torch.manual_seed(0)
    loaded = _model()
    pre = loaded.preprocessing
    plan = plan_surgery(loaded.model, "rolss", input_size=pre.input_size)
    before = _ce_on(loaded.model, small.train, pre)
    recipe = TrainingRecipe("tts", epochs=3, stage1_epochs=1, batch_size=24, lr=3e-3,
                            bido=BiDOConfig() if bido else None)
    log = tmp_path / "train.jsonl"
    result = run_schedule(loaded.model, plan, small, pre, recipe, device="cpu", workers=0,
                          state_path=tmp_path / "state", log_path=log)
    after = _ce_on(result.model, small.train, pre)
    assert after < before - 0.1, (before, after)
    assert [h["stage"] for h in result.history] == ["stage1", "stage2", "stage2", "stage2"]
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    # the LR schedule decays at 75 % and 90 % of all 4 epochs (epochs 3 and 4)
    assert [h["lr"] for h in result.history] == pytest.approx([3e-3, 3e-3, 3e-3, 3e-4])
    m = result.metrics
    assert set(m) == {"natural_acc_before", "natural_acc_after_surgery", "natural_acc_after"}
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert m["natural_acc_after"] > 1 / CLASSES  # better than chance on held-out images
    if bido:
        assert result.history[-1]["hsic_x"] > 0 and result.history[-1]["hsic_y"] > 0
        assert len(result.bido_features) == 5  # stem + 4 stages
    else:
        assert result.history[-1]["hsic_x"] is None
    # the surgery really happened: no shortcut projection left in the last stage
    assert not any(k.startswith("layer4.0.downsample") for k in result.model.state_dict())
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end" and events.count("epoch") == 4 and "surgery" in events

    out = tmp_path / "hardened.pt"
    save_model(out, result.model, arch=loaded.arch, num_classes=CLASSES, surgery=result.surgery.spec,
               preprocessing=pre, extra={"training": result.training_record(), "metrics": m})
    back = load_model(out)
    assert back.recipe["metrics"] == m and back.recipe["training"]["schedule"] == "tts"
    x = torch.randn(4, *pre.input_size)
    with torch.no_grad():
        assert torch.allclose(back.model(x), result.model(x), atol=1e-5)
    acc = evaluate_accuracy(back.model, small.val, pre, device="cpu", workers=0)
    assert acc == pytest.approx(m["natural_acc_after"])
    if not bido:
        from mishield.onnx_export import export_onnx

        report = export_onnx(back.model, tmp_path / "hardened.onnx", input_size=pre.input_size)
        assert report.top1_agreement == 1.0


def _final_weights(result) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in result.model.state_dict().items()}


@pytest.mark.parametrize("stop_after", [1, 2], ids=["after-stage1", "inside-stage2"])
def test_resume_after_an_interruption_replays_the_uninterrupted_run(fmnist_dir, tmp_path, stop_after):
    data = _subset(fmnist_dir, 16, 4)
    recipe = TrainingRecipe("tts", epochs=2, stage1_epochs=1, batch_size=16, seed=3)

    def run(state, **kw):
        torch.manual_seed(0)  # same initial weights in every run
        loaded = _model()
        plan = plan_surgery(loaded.model, "rolss", input_size=loaded.preprocessing.input_size)
        return run_schedule(loaded.model, plan, data, loaded.preprocessing, recipe, device="cpu", workers=0,
                            state_path=state, log_path=state.with_suffix(".jsonl"), **kw)

    reference = run(tmp_path / "ref")
    state = tmp_path / "state"
    with pytest.raises(TrainingInterrupted, match="`resume`"):
        run(state, stop_after=stop_after)
    saved = load_state(state)
    assert saved["epoch"] == stop_after and saved["stage"] == ("stage1" if stop_after == 1 else "stage2")
    resumed = run(state, resume=True)
    assert resumed.resumed_from == {"stage": saved["stage"], "epoch": stop_after}
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    ref_w, res_w = _final_weights(reference), _final_weights(resumed)
    assert ref_w.keys() == res_w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], res_w[k]), k
    log = [json.loads(line) for line in state.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["event"] for r in log].count("resume") == 1
    epochs = [r["epoch"] for r in log if r["event"] == "epoch"]
    assert epochs == [1, 2, 3][: stop_after] + [e for e in [1, 2, 3] if e > stop_after]


def test_resume_refuses_a_state_from_a_different_run(fmnist_dir, tmp_path):
    data = _subset(fmnist_dir, 8, 2)
    loaded = _model()
    plan = plan_surgery(loaded.model, "rolss", input_size=loaded.preprocessing.input_size)
    state = tmp_path / "state"
    with pytest.raises(TrainingInterrupted):
        run_schedule(loaded.model, plan, data, loaded.preprocessing, TrainingRecipe("finetune", epochs=2, batch_size=8),
                     device="cpu", workers=0, state_path=state, stop_after=1)
    loaded = _model()
    with pytest.raises(BadInputError, match="different run"):
        run_schedule(loaded.model, plan, data, loaded.preprocessing, TrainingRecipe("finetune", epochs=5, batch_size=8),
                     device="cpu", workers=0, state_path=state, resume=True)


class _Explodes(nn.Module):
    """A tiny classifier whose logits turn NaN after `after` forward passes in train mode."""

    def __init__(self, after: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.fc = nn.Linear(4, CLASSES)
        self.after, self.calls = after, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
        logits = self.fc(self.conv(x).mean((2, 3)))
        return logits * float("nan") if self.calls > self.after else logits


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_state(fmnist_dir, tmp_path):
    data = _subset(fmnist_dir, 8, 2)  # 24 images, batch 8: 3 steps per epoch
    pre = Preprocessing((3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    model = _Explodes(after=4)  # epoch 1 fine, NaN in epoch 2
    state = tmp_path / "state"
    with pytest.raises(TrainingDiverged, match="nan.*epoch 2.*lower --lr") as info:
        fit(model, data, pre, epochs=3, batch_size=8, device="cpu", workers=0, state_path=state)
    assert "\n" not in str(info.value)
    saved = load_state(state)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_fit_is_repeatable_on_cpu_with_a_seed(fmnist_dir):
    data = _subset(fmnist_dir, 8, 2)
    pre = Preprocessing((3, 32, 32), (0.5,) * 3, (0.5,) * 3)

    def once(seed):
        torch.manual_seed(0)
        model = _Explodes(after=10**9)
        return fit(model, data, pre, epochs=2, batch_size=8, device="cpu", workers=0, seed=seed).model

    a, b, c = once(1), once(1), once(2)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_reset_head_replaces_the_classifier():
    import torchvision

    tv = torchvision.models.resnet18(num_classes=10)
    reset_head(tv, 3)
    assert tv.fc.out_features == 3
    loaded = load_model(ARCH, num_classes=10, input_size=48)
    reset_head(loaded.model, 4)
    assert loaded.model(torch.randn(2, 3, 48, 48)).shape == (2, 4)


def test_recipe_validation():
    with pytest.raises(UsageError):
        TrainingRecipe("two-stage")
    with pytest.raises(UsageError):
        TrainingRecipe(lr=0)
    assert TrainingRecipe("tts", epochs=95, stage1_epochs=5).milestone_epochs() == [75, 90]
    assert TrainingRecipe("finetune", epochs=10).stages == [("finetune", 0, 10)]


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    from pathlib import Path
    from mishield.data import load_image_folders, DataSplits
    from mishield.models import load_model
    from mishield.surgery import plan_surgery
    from mishield.training import TrainingRecipe, run_schedule
    from mishield.training import BiDOConfig

    out = Path(sys.argv[1])
    full = load_image_folders(sys.argv[2])
    keep = {0: 0, 1: 1, 7: 2}
    pick = lambda items, n: [(p, keep[l]) for p, l in items if l in keep][: n]
    data = DataSplits(pick(full.train, 10**9)[:0] + [it for c in keep for it in
                      [(p, keep[l]) for p, l in full.train if l == c][:16]],
                      [it for c in keep for it in [(p, keep[l]) for p, l in full.val if l == c][:4]],
                      [full.classes[c] for c in keep])
    torch.manual_seed(0)
    loaded = load_model("timm:test_resnet", num_classes=3, input_size=48)
    plan = plan_surgery(loaded.model, "rolss", input_size=loaded.preprocessing.input_size)
    r = run_schedule(loaded.model, plan, data, loaded.preprocessing,
                     TrainingRecipe("tts", epochs=1, stage1_epochs=1, batch_size=8, bido=BiDOConfig()),
                     device="cpu", workers=0, state_path=out / "state", log_path=out / "log.jsonl")
    rank = int(os.environ["RANK"])
    torch.save({k: v for k, v in r.model.state_dict().items()}, out / f"weights{rank}.pt")
    (out / f"metrics{rank}.json").write_text(json.dumps({"metrics": r.metrics, "history": r.history}))
    """
)


def test_ddp_with_two_cpu_processes(fmnist_dir, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(tmp_path), str(fmnist_dir)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = torch.load(tmp_path / "weights0.pt")
    w1 = torch.load(tmp_path / "weights1.pt")
    for k in w0:  # DDP keeps the replicas identical
        assert torch.equal(w0[k], w1[k]), k
    m0 = json.loads((tmp_path / "metrics0.json").read_text())
    m1 = json.loads((tmp_path / "metrics1.json").read_text())

    def untimed(hist):
        return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in hist]

    # losses and accuracies are reduced over both ranks' shards, so every rank reports the same
    assert m0["metrics"] == m1["metrics"] and untimed(m0["history"]) == untimed(m1["history"])
    # 48 images, 2 ranks, batch 8 per rank: 3 steps per epoch on each rank
    assert [h["stage"] for h in m0["history"]] == ["stage1", "stage2"]
    # rank 0 alone writes: one start record, one record per epoch
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log].count("epoch") == 2 and log[0]["world"] == 2
    assert load_state(tmp_path / "state")["epoch"] == 2


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def small_dir(fmnist_dir, tmp_path_factory) -> Path:
    """3 classes x (16 train + 4 val) as its own ImageFolder, for CLI runs."""
    import shutil

    root = tmp_path_factory.mktemp("small")
    for split, n in (("train", 16), ("val", 4)):
        for cls in ("0_tshirt_top", "1_trouser", "7_sneaker"):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((fmnist_dir / split / cls).iterdir())[:n]:
                shutil.copy(f, root / split / cls / f.name)
    return root


def test_cli_harden_trains_and_records_recipe_and_accuracies(small_dir, tmp_path, capsys):
    out = tmp_path / "hard.pt"
    code, stdout, err = _cli(["harden", ARCH, "--num-classes", 3, "--input-size", 48, "--out", out,
                              "--data", small_dir, "--epochs", 1, "--stage1-epochs", 1, "--batch-size", 16,
                              "--bido", "--device", "cpu", "--workers", 0, "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["schedule"] == "tts"  # an untrained architecture spec gets the paper's TTS
    assert doc["recipe"]["lr"] == 1e-3 and doc["recipe"]["bido"]["lx"] == 0.05
    assert [e["stage"] for e in doc["epochs"]] == ["stage1", "stage2"]
    assert set(doc["metrics"]) == {"natural_acc_before", "natural_acc_after_surgery", "natural_acc_after"}
    back = load_model(out)
    assert back.recipe["metrics"] == doc["metrics"]
    assert back.recipe["training"]["classes"] == ["0_tshirt_top", "1_trouser", "7_sneaker"]
    assert back.recipe["training"]["bido"]["ly"] == 0.5
    assert not (tmp_path / "hard.pt.train-state").exists()  # superseded by the finished model
    log = [json.loads(line) for line in (tmp_path / "hard.pt.train.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[-1]["event"] == "end"

    # a trained checkpoint is fine-tuned (not TTS) at the lower default lr; table on stderr
    out2 = tmp_path / "again.pt"
    code, stdout, err = _cli(["harden", out, "--out", out2, "--data", small_dir, "--epochs", 1,
                              "--batch-size", 16, "--device", "cpu", "--workers", 0, "--method", "ssf"], capsys)
    assert code == 0, err
    assert stdout == ""
    assert "finetune" in err and "natural accuracy" in err and "after fine-tuning" in err
    again = load_model(out2)
    assert again.recipe["training"]["lr"] == 1e-4 and again.recipe["training"]["schedule"] == "finetune"
    assert len(again.recipe["surgery"]) == 2  # rolss then ssf, both replayed on load


def test_cli_bad_data_is_one_sentence_and_exit_3(small_dir, tmp_path, capsys):
    base = ["harden", ARCH, "--input-size", 48, "--out", tmp_path / "x.pt", "--device", "cpu", "--workers", 0]
    code, _, err = _cli(base + ["--num-classes", 5, "--data", small_dir], capsys)
    assert code == 3 and "3 class folders but the model has 5 outputs" in err and "--reset-head" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = _cli(base + ["--num-classes", 3, "--data", tmp_path / "nope"], capsys)
    assert code == 3 and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _cli(base + ["--num-classes", 3, "--data", empty], capsys)
    assert code == 3 and "no class sub-folders" in err
    code, _, err = _cli(base + ["--num-classes", 3, "--epochs", 2], capsys)
    assert code == 2 and "--data" in err


def test_cli_corrupt_image_is_named(small_dir, tmp_path, capsys):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(small_dir, data)
    (data / "train" / "1_trouser" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, _, err = _cli(["harden", ARCH, "--num-classes", 3, "--input-size", 48, "--out", tmp_path / "x.pt",
                         "--data", data, "--device", "cpu"], capsys)
    assert code == 3 and "broken.png" in err and len(err.strip().splitlines()) == 1


def test_cli_reset_head_and_resume_guard(small_dir, tmp_path, capsys):
    out = tmp_path / "h.pt"
    code, stdout, err = _cli(["harden", ARCH, "--num-classes", 10, "--input-size", 48, "--out", out,
                              "--data", small_dir / "train", "--val-fraction", 0.25, "--reset-head",
                              "--schedule", "finetune", "--epochs", 1, "--batch-size", 16,
                              "--device", "cpu", "--workers", 0, "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["val_images"] == 12 and doc["train_images"] == 36
    assert load_model(out).num_classes == 3
    # a leftover state from an interrupted run is never silently discarded
    state = tmp_path / "h2.pt.train-state"
    state.write_bytes(b"x")
    code, _, err = _cli(["harden", ARCH, "--num-classes", 3, "--input-size", 48, "--out", tmp_path / "h2.pt",
                         "--data", small_dir, "--device", "cpu"], capsys)
    assert code == 2 and "--resume" in err and "--overwrite" in err


# ---------------------------------------------------------------------------------------------
# CUDA (run with -m gpu on a machine with a GPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compiled"])
def test_cuda_tts_with_bido_bf16_channels_last(small, tmp_path, compile_model):
    torch.manual_seed(0)
    loaded = load_model("torchvision:resnet18", num_classes=CLASSES, input_size=64)
    pre = loaded.preprocessing
    plan = plan_surgery(loaded.model, "rolss", input_size=pre.input_size)
    before = _ce_on(loaded.model, small.train, pre)
    recipe = TrainingRecipe("tts", epochs=3, stage1_epochs=1, batch_size=32, lr=1e-3, bido=BiDOConfig())
    result = run_schedule(loaded.model, plan, small, pre, recipe, device="cuda", workers=2,
                          compile=compile_model, state_path=tmp_path / "state", log_path=tmp_path / "log.jsonl")
    assert all(torch.isfinite(torch.tensor([h["train_loss"], h["hsic_x"], h["hsic_y"]])).all() for h in result.history)
    assert all(p.device.type == "cpu" for p in result.model.parameters())
    assert _ce_on(result.model, small.train, pre) < before
    assert result.metrics["natural_acc_after"] > 0.5
    out = tmp_path / "m.pt"
    save_model(out, result.model, arch=loaded.arch, num_classes=CLASSES, surgery=result.surgery.spec,
               preprocessing=pre, extra={"metrics": result.metrics})
    assert load_model(out).recipe["metrics"] == result.metrics


def test_resume_with_a_lower_lr_continues_at_that_lr(fmnist_dir, tmp_path):
    data = _subset(fmnist_dir, 8, 2)
    state = tmp_path / "state"

    def run(lr, **kw):
        torch.manual_seed(0)
        loaded = _model()
        plan = plan_surgery(loaded.model, "rolss", input_size=loaded.preprocessing.input_size)
        return run_schedule(loaded.model, plan, data, loaded.preprocessing,
                            TrainingRecipe("finetune", epochs=3, batch_size=8, lr=lr),
                            device="cpu", workers=0, state_path=state, **kw)

    with pytest.raises(TrainingInterrupted):
        run(1e-3, stop_after=1)
    resumed = run(2e-4, resume=True)
    # the new rate takes over where the old one was, and the schedule still decays at 75 % (epoch 3)
    assert [h["lr"] for h in resumed.history] == pytest.approx([1e-3, 2e-4, 2e-5])


# ---------------------------------------------------------------------------------------------
# Preemption (SIGTERM), Ctrl-C and --resume through the command line, for every trainer

REPO = Path(__file__).resolve().parents[2]


def _mishield(argv, state: Path | None = None) -> tuple[int, str]:
    """Run `python -m mishield ARGV` in a fresh process; with `state`, send SIGTERM as soon as the
    first epoch's resumable state appears (as a scheduler preempting the job would)."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mishield", *map(str, argv)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if state is not None:
        deadline = time.monotonic() + 300
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)  # a no-op if it already ended (the test then fails on the code)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A trained-looking checkpoint with fixed weights, so separate processes start from the same model."""
    path = tmp_path_factory.mktemp("model") / "m.pt"
    torch.manual_seed(0)
    loaded = _model()
    save_model(path, loaded.model, arch=ARCH, num_classes=CLASSES, surgery=None, preprocessing=loaded.preprocessing)
    return path


@pytest.mark.slow  # three fresh processes (each imports torch): ~45 s on a busy 2-core machine
def test_sigterm_during_fine_tuning_exits_143_and_resume_matches_an_uninterrupted_run(model_file, small_dir,
                                                                                        tmp_path, capsys):
    args = ["--data", small_dir, "--schedule", "finetune", "--epochs", 4, "--batch-size", 16,
            "--device", "cpu", "--workers", 0, "--seed", 1]
    code, err = _mishield(["harden", model_file, "--out", tmp_path / "ref.pt", *args])
    assert code == 0, err
    assert err.count("finetune epoch") == 4  # one plain line per epoch without a terminal

    out, state = tmp_path / "cut.pt", tmp_path / "cut.pt.train-state"
    code, err = _mishield(["harden", model_file, "--out", out, *args], state=state)
    assert code == 143, err
    assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert state.exists() and not out.exists()
    done = load_state(state)["epoch"]
    assert 1 <= done < 4

    # a resumed run must be the same run: another resolution is refused, saying what differs
    code, _, err = _cli(["harden", model_file, "--out", out, *args, "--input-size", 32, "--resume"], capsys)
    assert code == 3 and "input_size" in err and len(err.strip().splitlines()) == 1
    assert load_state(state)["epoch"] == done  # the refusal left the state alone

    code, err = _mishield(["harden", model_file, "--out", out, *args, "--resume"])
    assert code == 0, err
    assert not state.exists()
    ref, resumed = load_model(tmp_path / "ref.pt"), load_model(out)
    assert ref.recipe["metrics"] == resumed.recipe["metrics"]
    ref_w, res_w = ref.model.state_dict(), resumed.model.state_dict()
    for k in ref_w:
        assert torch.equal(ref_w[k], res_w[k]), k


def _public(root: Path, per_class: int = 48) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((torch.rand(20, 20, generator=gen) * 255).to(torch.uint8).numpy(), mode="L").save(
                root / c / f"{i}.png")
    return root


@pytest.mark.slow  # three fresh processes (each imports torch): ~45 s on a busy 2-core machine
def test_sigterm_during_prior_training_exits_143_and_resume_matches_an_uninterrupted_run(tmp_path):
    from mishield.models.dcgan import load_generator_file

    data = _public(tmp_path / "public")
    args = ["--data", data, "--resolution", 32, "--latent-dim", 8, "--width", 4, "--epochs", 5,
            "--batch-size", 16, "--device", "cpu", "--seed", 1]
    code, err = _mishield(["prior", "train", "--out", tmp_path / "ref.safetensors", *args])
    assert code == 0, err
    assert err.count("prior epoch") == 5

    out, state = tmp_path / "cut.safetensors", tmp_path / "cut.safetensors.train-state"
    code, err = _mishield(["prior", "train", "--out", out, *args], state=state)
    assert code == 143, err
    assert "SIGTERM" in err and state.exists() and not out.exists()
    assert 1 <= load_state(state, kind="prior")["epoch"] < 5
    code, err = _mishield(["prior", "train", "--out", out, *args, "--resume"])
    assert code == 0, err
    assert not state.exists()
    a, _ = load_generator_file(tmp_path / "ref.safetensors")
    b, _ = load_generator_file(out)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    # the discriminator is kept (the audit's public feature space) and resumes exactly too
    from mishield.models.dcgan import load_discriminator

    da, db = load_discriminator(tmp_path / "ref.safetensors"), load_discriminator(out)
    for (name, p), q in zip(da.state_dict().items(), db.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_damaged_or_newer_state_is_bad_input_for_every_trainer(model_file, small_dir, tmp_path, capsys):
    from mishield.training import STATE_FORMAT

    public = _public(tmp_path / "public", per_class=4)
    commands = {
        "harden": ["harden", model_file, "--data", small_dir, "--epochs", 1, "--device", "cpu", "--workers", 0],
        "prior": ["prior", "train", "--data", public, "--resolution", 32, "--epochs", 1, "--device", "cpu"],
        "train-eval": ["train-eval", "--data", small_dir, "--input-size", 16, "--epochs", 1, "--device", "cpu"],
    }
    for name, argv in commands.items():
        out = tmp_path / f"{name}.out"
        state = tmp_path / f"{name}.out.train-state"
        state.write_bytes(b"PK\x03\x04 not really a zip")
        code, _, err = _cli([*argv, "--out", out, "--resume"], capsys)
        assert code == 3 and "not a readable training state" in err, (name, err)
        torch.save({"format": STATE_FORMAT, "version": 99, "epoch": 1, "fingerprint": {}}, state)
        code, _, err = _cli([*argv, "--out", out, "--resume"], capsys)
        assert code == 3 and "upgrade" in err, (name, err)
        kind = "prior" if name == "prior" else "classifier"
        torch.save({"format": STATE_FORMAT, "version": 1, "kind": kind, "epoch": 1, "fingerprint": {}}, state)
        code, _, err = _cli([*argv, "--out", out, "--resume"], capsys)
        assert code == 3 and "damaged training state" in err, (name, err)
        assert not out.exists()


def test_resume_with_nothing_to_resume_says_so(fmnist_dir, tmp_path, caplog):
    data = _subset(fmnist_dir, 8, 0)
    pre = Preprocessing((3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    with caplog.at_level("WARNING", logger="mishield.training"):
        result = fit(_Explodes(after=10**6), data, pre, epochs=1, batch_size=8, device="cpu", workers=0,
                     state_path=tmp_path / "none", resume=True)
    assert result.resumed_from_epoch is None and len(result.history) == 1
    assert "nothing to resume" in caplog.text and str(tmp_path / "none") in caplog.text


def test_train_eval_refuses_a_single_class_and_a_leftover_state(small_dir, tmp_path, capsys):
    import shutil

    one = tmp_path / "one"
    shutil.copytree(small_dir / "train" / "1_trouser", one / "1_trouser")
    code, _, err = _cli(["train-eval", "--data", one, "--out", tmp_path / "e.pt", "--input-size", 16,
                         "--epochs", 1, "--device", "cpu"], capsys)
    assert code == 3 and "at least 2 classes" in err
    assert not (tmp_path / "e.pt").exists()
    # a state left by an interrupted run is neither ignored nor silently dropped
    (tmp_path / "e.pt.train-state").write_bytes(b"x")
    code, _, err = _cli(["train-eval", "--data", small_dir, "--out", tmp_path / "e.pt", "--input-size", 16,
                         "--epochs", 1, "--device", "cpu"], capsys)
    assert code == 2 and "--resume" in err


def test_sigterm_handler_is_installed_only_while_training():
    import signal
    import time

    from mishield.training import preemptible
    from mishield.training.interrupt import Preempted

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted), preemptible():
        assert signal.getsignal(signal.SIGTERM) is not before
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once; the sleep only gives it a point to run
    assert signal.getsignal(signal.SIGTERM) is before
