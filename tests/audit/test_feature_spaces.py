"""The audit's feature spaces (mishield/audit/feature_spaces.py): the prior file's discriminator as
the public extractor, and each judged row's KNN judge, false-positive share, distribution figures
and histograms on constructed features whose answers are known."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mishield.audit.feature_spaces import (
    EVALUATOR,
    PUBLIC,
    FeatureSpace,
    judge_rows,
    public_extractor,
)
from mishield.audit.judging import Row
from mishield.errors import BadInputError
from mishield.models.dcgan import (
    DISCRIMINATOR_PREFIX,
    DCGANDiscriminator,
    DCGANGenerator,
    load_discriminator,
    load_generator_file,
    save_generator,
)


def _prior(tmp_path, discriminator: DCGANDiscriminator | None, name: str = "prior.safetensors"):
    torch.manual_seed(0)
    return save_generator(tmp_path / name, DCGANGenerator(8, 32, 1, 4).eval(), {}, discriminator=discriminator)


def test_the_prior_file_keeps_its_discriminator_and_the_audit_reads_its_features(tmp_path):
    torch.manual_seed(1)
    d = DCGANDiscriminator(32, 1, 4)
    for m in d.modules():  # non-trivial batch-norm statistics, which must travel with the weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = _prior(tmp_path, d.eval())
    back = load_discriminator(path)
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), back.state_dict().values()))
    generator, meta = load_generator_file(path)  # the generator still loads beside it
    assert meta["version"] == 2 and isinstance(generator, DCGANGenerator)
    extractor = public_extractor(path)
    images = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    from mishield.audit.evaluator import Evaluator
    from mishield.runtime import Runtime

    reader = Evaluator(extractor.model, extractor.preprocessing, Runtime(torch.device("cpu")), output_features=True)
    features = reader.images(images)[1]
    # the discriminator reads [-1, 1]: the input contract maps uint8 images exactly there
    expected = d.features(images.float() / 127.5 - 1.0)
    assert features.shape == (6, 4 * 4 * 16) and torch.allclose(features, expected, atol=1e-5)
    assert reader.feature_source == "output"


def test_a_prior_without_a_discriminator_gives_no_public_space_and_a_damaged_one_is_refused(tmp_path):
    assert public_extractor(_prior(tmp_path, None)) is None
    assert public_extractor(tmp_path / "missing.safetensors") is None and public_extractor("pkg.module:factory") is None
    from safetensors.torch import load_file, save_file

    path = _prior(tmp_path, DCGANDiscriminator(32, 1, 4), "bad.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    state[DISCRIMINATOR_PREFIX + "net.0.weight"] = torch.zeros(3, 1, 4, 4)  # does not fit the recorded width
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(BadInputError, match="discriminator weights that do not fit"):
        load_discriminator(path)
    assert json.loads(metadata["mishield"])["version"] == 2


def _cluster(centre: int, n: int, seed: int, dims: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dims, generator=g) * 0.3
    x[:, centre] += 10.0
    return x


def _space(kind: str = PUBLIC) -> FeatureSpace:
    # the reader only computes features, which these tests give directly (`use`)
    space = FeatureSpace("constructed", kind, reader=SimpleNamespace(feature_source="output"))
    train = torch.cat([_cluster(c, 30, c) for c in range(3)]), torch.arange(3).repeat_interleave(30)
    val = torch.cat([_cluster(c, 10, 10 + c) for c in range(3)]), torch.arange(3).repeat_interleave(10)
    space.use(train, val)
    return space


def _row(evaluator_hits: np.ndarray) -> Row:
    return Row(attack="ppa", metrics={}, per_class=[{"class": c} for c in range(3)], verdict={}, hits=[evaluator_hits],
               evaluator=0, interval=None, grid="", timing={}, budget={}, shown={})  # fmt: skip


def test_the_knn_judge_confirms_faithful_reconstructions_and_rejects_another_class(tmp_path):
    space = _space()
    faithful = torch.stack([_cluster(c, 6, 20 + c) for c in range(3)])  # [classes, images, dims]
    # class 0's "reconstructions" look like class 1's private images, yet the evaluator counts them all
    fooled = torch.stack([_cluster(1, 6, 30), _cluster(1, 6, 31), _cluster(2, 6, 32)])
    all_hits = np.ones((3, 6))
    rows = [_row(all_hits), _row(all_hits)]
    judge_rows(rows, [[faithful], [fooled]], [0, 1, 2], [space])

    good, bad = rows[0].metrics, rows[1].metrics
    assert good["knn_judge_extractor"] == "constructed" and good["knn_judge_acc1"] == 1.0 and good["false_positive_share"] == 0.0
    assert bad["knn_judge_acc1"] == pytest.approx(2 / 3) and bad["false_positive_share"] == pytest.approx(1 / 3)
    assert bad["judge_disagreement"] == pytest.approx(1 / 3)
    entry = bad["feature_extractors"][0]
    assert entry["judge_counts"] == {"images": 18, "evaluator_hits": 18, "knn_hits": 12, "both": 12, "rejected": 6, "rescued": 0}
    assert entry["false_positive_share_interval"]["low"] <= 1 / 3 <= entry["false_positive_share_interval"]["high"]
    assert [r["knn_judge_acc1"] for r in rows[1].per_class] == [0.0, 1.0, 1.0]
    # distribution figures: faithful reconstructions are closer to the private images than misplaced ones
    assert good["feature_extractors"][0]["fid"] < entry["fid"]
    assert good["feature_extractors"][0]["coverage"] > entry["coverage"]
    assert rows[1].per_class[0]["feature_extractors"][0]["precision"] == 0.0  # class 0's images sit in class 1's cluster
    assert space.ceiling() == (1.0, 30)


def test_every_evaluator_gets_its_own_false_positive_share():
    space = _space()
    f = torch.stack([_cluster(1, 6, 60), _cluster(1, 6, 61), _cluster(2, 6, 62)])  # class 0 looks like class 1
    fooled, careful = np.ones((3, 6)), np.vstack([np.zeros(6), np.ones(6), np.ones(6)])
    row = Row(attack="ppa", metrics={"evaluators": [{"evaluator": "a"}, {"evaluator": "b"}]}, per_class=[{"class": c} for c in range(3)],
              verdict={}, hits=[fooled, careful], evaluator=0, interval=None, grid="", timing={}, budget={}, shown={})  # fmt: skip
    judge_rows([row], [[f]], [0, 1, 2], [space])
    a, b = row.metrics["evaluators"]
    assert a["false_positive_share"] == pytest.approx(1 / 3) and b["false_positive_share"] == 0.0
    assert row.metrics["false_positive_share"] == pytest.approx(1 / 3)  # the row reads its own evaluator, the first


def test_histograms_share_one_set_of_bins_per_space_and_count_every_reconstruction():
    space = _space()
    near = torch.stack([_cluster(c, 5, 40 + c) for c in range(3)])
    far = near + 3.0  # every reconstruction moved away from its class
    rows = [_row(np.ones((3, 5))), _row(np.zeros((3, 5)))]
    judge_rows(rows, [[near], [far]], [0, 1, 2], [space])
    hist = space.histogram
    assert len(hist["edges"]) == 21 and hist["edges"][0] == 0.0 and sum(hist["private_val"]) == 30
    counts = [r.metrics["feature_extractors"][0]["distance_histogram"] for r in rows]
    assert [sum(c) for c in counts] == [15, 15]
    assert rows[0].metrics["feature_extractors"][0]["knn_distance_median"] < rows[1].metrics["feature_extractors"][0]["knn_distance_median"]
    # no evaluator hit: no share of hits to reject
    assert rows[1].metrics["false_positive_share"] is None and rows[1].metrics["false_positive_share_interval"] is None


def test_two_spaces_are_reported_side_by_side_the_first_one_flat():
    public, evaluator = _space(PUBLIC), _space(EVALUATOR)
    evaluator.extractor = "evaluator eval.pt"
    f = torch.stack([_cluster(c, 4, 50 + c) for c in range(3)])
    row = _row(np.ones((3, 4)))
    judge_rows([row], [[f, f * 2]], [0, 1, 2], [public, evaluator])
    assert [e["extractor"] for e in row.metrics["feature_extractors"]] == ["constructed", "evaluator eval.pt"]
    assert [e["extractor_kind"] for e in row.metrics["feature_extractors"]] == [PUBLIC, EVALUATOR]
    assert row.metrics["knn_judge_extractor"] == "constructed"
    assert public.record()["trained_on"] == "public" and evaluator.record()["trained_on"] == "private"
