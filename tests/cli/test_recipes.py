"""--recipe: YAML defaults that command-line flags override."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from clirun import run_cli as run

from mishield.cli.harden_cmd import RECIPE_KEYS

ROOT = Path(__file__).resolve().parents[2]


def harden(tmp_path, recipe_text, *flags, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    return run(["harden", "torchvision:resnet18", "--input-size", "64", "--out", str(tmp_path / "h.pt"),
                "--recipe", str(recipe), "--json", *flags], capsys)


def test_recipe_sets_defaults(tmp_path, capsys):
    code, out, err = harden(tmp_path, "method: ssf\nalpha: 0.5\nsites: layer3\n", capsys=capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["method"] == "ssf" and summary["alpha"] == 0.5
    assert summary["sites"] == ["layer3.0.add", "layer3.1.add"]


def test_command_line_flags_win(tmp_path, capsys):
    code, out, err = harden(tmp_path, "method: ssf\nalpha: 0.5\n", "--alpha", "0.3", capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["alpha"] == 0.3


def test_unknown_key_is_a_usage_error(tmp_path, capsys):
    code, out, err = harden(tmp_path, "methd: ssf\n", capsys=capsys)
    assert code == 2 and "methd" in err and out == ""


def test_broken_yaml_is_bad_input(tmp_path, capsys):
    code, _, err = harden(tmp_path, "method: [ssf\n", capsys=capsys)
    assert code == 3 and "not valid YAML" in err


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_use_known_keys(path):
    recipe = yaml.safe_load(path.read_text())
    assert isinstance(recipe, dict) and set(recipe) <= set(RECIPE_KEYS)
    assert recipe["method"] in ("rolss", "ssf")


@pytest.mark.parametrize("text,words", [
    ("batch_size: abc\n", ["batch_size", "'abc'", "valid integer"]),
    ("batch_size: 0\n", ["batch_size", "0", "greater than or equal to 1"]),
    ("alpha: 1.5\n", ["alpha", "1.5", "less than or equal to 1"]),
    ("lr: -0.1\n", ["lr", "-0.1", "greater than or equal to 0"]),
    ("val_fraction: 2\n", ["val_fraction", "2", "less than or equal to 1"]),
    ("stage1_epochs: -1\n", ["stage1_epochs", "-1", "greater than or equal to 0"]),
])
def test_recipe_values_are_checked_like_flags(tmp_path, capsys, text, words):
    """The same types and bounds as the command-line options (the flag's own type does the check);
    a recipe is an input file, so a bad value in it is bad input: exit 3 (docs/reliability.md)."""
    code, out, err = harden(tmp_path, text, capsys=capsys)
    assert code == 3 and out == "", err
    assert all(w in err for w in words), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # the flag with the same value is refused for the same reason (a usage error there: exit 2)
    key, value = text.strip().split(": ")
    code, _, flag_err = run(["harden", "torchvision:resnet18", "--out", str(tmp_path / "f.pt"),
                             f"--{key.replace('_', '-')}", value], capsys)
    assert code == 2 and words[-1] in flag_err, flag_err


def test_recipe_values_are_converted_like_flags(tmp_path, capsys):
    # YAML reads `alpha: "0.5"` as a string; the flag's type makes it the number it names
    code, out, err = harden(tmp_path, 'method: ssf\nalpha: "0.5"\n', capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["alpha"] == 0.5


# The defence recipes, with their papers' settings: each loads from Python and from the command
# line to the same configuration (the CLI's `erase` string and the library's triple agree).
DEFENCE_RECIPES = {
    "negative-ls.yaml": {"method": "ssf", "alpha": 1.0, "neg_ls": -0.05, "erase": None, "freeze_stages": 0},
    "midre-erase.yaml": {"method": "ssf", "alpha": 1.0, "neg_ls": None, "erase": (1.0, 0.1, 0.8), "freeze_stages": 0},
    "tl-dmi.yaml": {"method": "ssf", "alpha": 1.0, "neg_ls": None, "erase": None, "freeze_stages": 2, "public_epochs": 20},
    "stacked-rolss-negls-erase.yaml": {"method": "rolss", "alpha": None, "neg_ls": -0.05, "erase": (1.0, 0.1, 0.8),
                                       "freeze_stages": 0},
}


@pytest.mark.parametrize("name", sorted(DEFENCE_RECIPES))
def test_defence_recipes_load_with_their_papers_settings(name, monkeypatch, capsys, tmp_path):
    from mishield import hardening
    from mishield.hardening import HardenConfig

    expected = DEFENCE_RECIPES[name]
    config = HardenConfig.from_recipe(ROOT / "recipes" / name)
    assert {k: getattr(config, k) for k in expected} == expected
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(99)

    monkeypatch.setattr(hardening, "harden", fake)
    code, _, err = run(["harden", "m.pt", "--out", str(tmp_path / "h.pt"), "--data", str(tmp_path),
                        "--recipe", str(ROOT / "recipes" / name)], capsys)
    assert code == 99, err
    assert seen["config"] == config  # the command line reads the file to the same configuration
