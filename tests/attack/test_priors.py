"""Priors: mishield's generator and its file, user generators, StyleGAN-like W space, pixels."""

from __future__ import annotations

import json
import pickle
import sys

import pytest
import torch
from torch import nn

from mishield.attack.priors import GeneratorPrior, PixelPrior, StyleGANPrior, load_prior
from mishield.errors import BadInputError, UsageError
from mishield.models.dcgan import (
    DCGANGenerator,
    load_generator_file,
    save_generator,
)
from mishield.training.prior import PriorTrainingConfig, train_prior


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_dcgan_generator_makes_images_in_range(resolution):
    g = DCGANGenerator(latent_dim=16, resolution=resolution, channels=3, width=8).eval()
    x = g(torch.randn(2, 16))
    assert x.shape == (2, 3, resolution, resolution)
    assert x.min() >= -1 and x.max() <= 1


def test_prior_file_round_trip_is_self_describing(tmp_path):
    g = DCGANGenerator(16, 32, 1, 8).eval()
    path = save_generator(tmp_path / "p.safetensors", g, {"epochs": 3})
    with pytest.raises(UsageError, match="--overwrite"):
        save_generator(path, g, {})
    loaded, meta = load_generator_file(path)
    z = torch.randn(3, 16)
    assert torch.equal(loaded(z), g(z))
    assert meta["config"] == {"latent_dim": 16, "resolution": 32, "channels": 1, "width": 8}
    prior = load_prior(str(path))
    assert isinstance(prior, GeneratorPrior) and prior.image_shape == (1, 32, 32) and prior.latent_shape == (16,)
    assert prior.describe()["training"] == {"epochs": 3}


def test_a_safetensors_file_that_is_not_a_prior_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(BadInputError, match="prior"):
        load_prior(str(tmp_path / "m.safetensors"))


def test_user_generator_factories_are_checked_for_shape_and_range():
    prior = load_prior("attack_support:tiny_generator")
    assert isinstance(prior, GeneratorPrior) and prior.image_shape == (1, 16, 16)
    with pytest.raises(BadInputError, match=r"\[-1, 1\]"):
        load_prior("attack_support:generator_0_255")
    with pytest.raises(BadInputError, match=r"\(N, C, H, W\)"):
        load_prior("attack_support:generator_flat")
    with pytest.raises(BadInputError, match="(?i)cannot import"):
        load_prior("no_such_module_xyz:factory")
    with pytest.raises(BadInputError, match="neither"):
        load_prior("missing-file.safetensors")


def test_stylegan_like_generators_are_optimised_in_w_with_truncation():
    prior = load_prior("attack_support:stylegan_like", truncation=0.5)
    assert isinstance(prior, StyleGANPrior) and prior.latent_shape == (6,) and prior.num_ws == 3
    g = prior.generator
    w = prior.sample(4, torch.Generator().manual_seed(0), torch.device("cpu"))
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    raw = g.mapping.fc(z)
    assert torch.allclose(w, g.mapping.w_avg + 0.5 * (raw - g.mapping.w_avg), atol=1e-6)
    g.synthesis.calls.clear()
    images = prior.generate(w)
    assert images.shape == (4, 3, 16, 16)
    assert g.synthesis.calls == [torch.Size([4, 3, 6])]  # one w broadcast to every layer


def test_stylegan_pickles_need_trust_and_their_own_code(tmp_path, monkeypatch):
    from attack_support import stylegan_like

    path = tmp_path / "network.pkl"
    with open(path, "wb") as f:
        pickle.dump({"G_ema": stylegan_like(), "D": None}, f)
    with pytest.raises(BadInputError, match="--trust-checkpoint"):
        load_prior(str(path))
    assert isinstance(load_prior(str(path), trust_checkpoint=True), StyleGANPrior)

    (tmp_path / "vendor_net.py").write_text("import torch\nclass G(torch.nn.Module):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vendor_net

    with open(tmp_path / "vendor.pkl", "wb") as f:
        pickle.dump({"G_ema": vendor_net.G()}, f)
    monkeypatch.delitem(sys.modules, "vendor_net")
    (tmp_path / "vendor_net.py").unlink()
    with pytest.raises(BadInputError, match="PYTHONPATH"):
        load_prior(str(tmp_path / "vendor.pkl"), trust_checkpoint=True)


def test_pixel_prior_matches_batchnorm_statistics_and_smoothness():
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    prior = load_prior("none", target_input_size=(3, 12, 12))
    assert isinstance(prior, PixelPrior) and prior.image_shape == (3, 12, 12)
    latents = prior.sample(5, torch.Generator().manual_seed(0), torch.device("cpu")).requires_grad_(True)
    prior.attach(target)
    images = prior.generate(latents)
    target(images)
    reg = prior.regularizer(images)
    reg.backward()
    assert prior.bn_layers == 2 and prior.describe()["bn_layers"] == 2
    assert reg > 0 and latents.grad.abs().sum() > 0
    prior.detach()
    target(images.detach())
    assert prior.regularizer(images.detach()) < reg  # no BN terms once detached: TV alone


def _tiny_public(tmp_path, per_class: int = 24):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        folder = tmp_path / "public" / c
        folder.mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(20, 20, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr, mode="L").save(folder / f"{i}.png")
    return tmp_path / "public"


def test_prior_training_resumes_where_it_stopped(tmp_path):
    data = _tiny_public(tmp_path)
    config = PriorTrainingConfig(resolution=32, latent_dim=8, width=4, epochs=2, batch_size=16, seed=1)
    straight = train_prior(data, tmp_path / "straight.safetensors", config)

    class Stop(Exception):
        pass

    def stop_in_second_epoch(_, done, total):
        if done > total // 2:
            raise Stop

    with pytest.raises(Stop):
        train_prior(data, tmp_path / "resumed.safetensors", config, progress=stop_in_second_epoch)
    checkpoint = tmp_path / "resumed.safetensors.train-state"
    assert checkpoint.exists() and not (tmp_path / "resumed.safetensors").exists()
    with pytest.raises(UsageError, match="--resume"):
        train_prior(data, tmp_path / "resumed.safetensors", config)
    resumed = train_prior(data, tmp_path / "resumed.safetensors", config, resume=True)
    assert not checkpoint.exists()
    a, meta = load_generator_file(straight)
    b, _ = load_generator_file(resumed)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert meta["config"]["channels"] == 1  # inferred from greyscale data
    assert json.loads(json.dumps(meta))["training"]["images"] == 48
