"""Messages name what the reader can type: the command line's flags (--val-fraction), the library's
parameters (`val_fraction`), from one mapping (`mishield.cli.options.flag_for`), in errors and in
the warnings the library logs alike."""

from __future__ import annotations

import logging

import pytest
import torch
from attack_support import noise_image_folder, tiny_resnet
from clirun import run_cli

from mishield.cli.options import flags_in_text


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    noise_image_folder(root / "flat", per_class=10)  # no val/ folder: every command holds out 10 %
    torch.manual_seed(0)
    torch.save(tiny_resnet(num_classes=3).state_dict(), root / "plain.pt")
    return root


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def test_harden_warnings_name_flags_not_parameters(files, tmp_path, capsys):
    code, _, err = run_cli(["harden", files / "plain.pt", "--arch", "attack_support:tiny_resnet", "--data", files / "flat",
                            "--epochs", "1", "--device", "cpu", "--workers", "0", "--force", "--out", tmp_path / "h.pt"], capsys)
    assert code == 0, err
    said = " ".join(_warnings(err))
    assert "choose the share with --val-fraction, or give validation images in a val/ folder or with --val-data" in said
    assert "pass --input-size to choose" in said and "pass --mean and --std to choose" in said
    assert "`" not in said


def test_audit_warnings_name_only_the_audits_own_flags(files, tmp_path, capsys):
    code, _, err = run_cli(["audit", files / "plain.pt", "--arch", "attack_support:tiny_resnet", "--data", files / "flat",
                            "--eval-model", "attack_support:small_plain_cnn", "--prior", "none", "--device", "cpu",
                            "--out", tmp_path / "report"], capsys)
    assert code == 3, err  # an untrained 10-class evaluator is refused; the warnings came before
    said = " ".join(_warnings(err))
    assert "choose the share with --val-fraction, or give validation images in a val/ folder;" in said
    assert "--val-data" not in said and "`" not in said  # audit has no --val-data to advise


def test_the_library_keeps_its_parameter_names(files, caplog):
    from mishield.data import resolve_val_fraction

    with caplog.at_level(logging.WARNING):
        resolve_val_fraction(files / "flat", val_data_option=True)
    assert "`val_fraction`" in caplog.text and "`val_data`" in caplog.text


def test_unknown_backticked_words_stay():
    assert flags_in_text("pass `val_fraction`, not `none` or `z_dim`", {"val_fraction", "samples"}) == \
        "pass --val-fraction, not `none` or `z_dim`"
    assert flags_in_text("`samples` is too small", {"samples"}) == "-S/--samples is too small"
