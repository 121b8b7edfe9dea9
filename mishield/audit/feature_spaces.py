"""The audit's feature spaces: reconstructions judged as a distribution, and by a judge that is not a classifier.

Attack accuracy asks an evaluation classifier about each reconstruction, and such a classifier can
be fooled by features an attack plants through the target (Ho et al., 2025, "Revisiting model
inversion evaluation"). So every kept reconstruction is also read in one or two *feature spaces*
that do not come from the target:

* `public`: the prior's DCGAN discriminator (`mishield prior train` keeps it in the prior file,
  `mishield.models.dcgan.load_discriminator`), trained on the public images only, which the audit
  checks against the private ones by pixel hash (docs/audit.md "Trust checks"). It has seen no
  private image and never the target.
* `evaluator`: the first evaluation model's penultimate features (trained on the private data).

In each space, per audited model and attack (a judging `Row`): FID, precision, recall, density and
coverage against the private training images of the attacked classes, per class and pooled
(`mishield.audit.fidelity.fidelity_summary`); the KNN judge (a reconstruction counts when its
nearest private training image, among all classes, is of the attacked class); its agreement with
the row's evaluator and the share of that evaluator's hits it rejects, the estimate of false
positives, with class-bootstrap intervals; and a histogram of each reconstruction's distance to
the nearest private training image of its class beside that of the private validation images (the
distance a real unseen image of the class has). Figures of different spaces never compare
(docs/audit.md, "Distribution metrics and the KNN judge").
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mishield.audit.evaluator import Evaluator
from mishield.audit.fidelity import (
    METRICS,
    fidelity_summary,
    judge_agreement,
    knn_judge_hits,
    rejected_share,
)
from mishield.audit.judging import per_class
from mishield.audit.metrics import knn_distances
from mishield.preprocessing import Preprocessing

PUBLIC, EVALUATOR = "public", "evaluator"
HISTOGRAM_BINS = 20
# Why each kind of space is there, in report.json's `feature_extractors[].why` and on the page.
WHY = {
    PUBLIC: "trained by mishield prior train on the public images only (the audit checks that no private image is among "
            "them): it has seen no private image and never the target, so features an attack plants through the target "
            "are not likeness here",
    EVALUATOR: "trained on the private data like the target, so features an attack plants through the target may carry "
               "over to it; compare with the public space",
}  # fmt: skip


@dataclass
class PublicExtractor:
    """A feature extractor trained on public data only: the module (its output is the features) and its input contract."""

    name: str
    model: torch.nn.Module
    preprocessing: Preprocessing
    source: str


def public_extractor(prior) -> PublicExtractor | None:
    """The discriminator kept in a mishield prior file (format 2), or None (an older prior, a StyleGAN
    pickle, a factory, `none`, a `Prior` object)."""
    from mishield.models.dcgan import DiscriminatorFeatures, load_discriminator

    if not isinstance(prior, (str, Path)) or not Path(prior).is_file():
        return None
    discriminator = load_discriminator(Path(prior))
    if discriminator is None:
        return None
    size, channels = discriminator.resolution, discriminator.channels
    # The discriminator reads images in [-1, 1], which mean = std = 0.5 maps [0, 1] to.
    preprocessing = Preprocessing((channels, size, size), (0.5,) * channels, (0.5,) * channels)
    return PublicExtractor(f"prior discriminator ({Path(prior).name})", DiscriminatorFeatures(discriminator), preprocessing, str(prior))


@dataclass
class FeatureSpace:
    """One feature extractor the reconstructions are read in, with the private images' features in it.

    `train` / `val`: features and labels of the private training / validation images, every class,
    degraded to the attack's resolution as the KNN distance's are (docs/audit.md "Trust checks").
    """

    extractor: str
    kind: str
    reader: Evaluator
    source: str | None = None
    train: tuple[torch.Tensor, torch.Tensor] | None = None
    val: tuple[torch.Tensor, torch.Tensor] | None = None
    # what this space added to the audit, wall and process CPU seconds: the private images' features,
    # the kept reconstructions' features (the evaluator's space reuses the evaluator's), the figures
    seconds: dict = field(default_factory=lambda: dict.fromkeys(("prepare", "features", "figures", "prepare_cpu", "features_cpu",
                                                                 "figures_cpu"), 0.0))  # fmt: skip
    histogram: dict | None = None  # edges and the private validation images' counts, once every row is judged
    _val_distances: torch.Tensor | None = None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) as the prior made them -> (N, D) features on the CPU."""
        with self._timed("features"):
            return self.reader.images(images)[1]

    def prepare(self, data, image_shape, progress=None, train: tuple | None = None) -> None:
        """The private images' features (`train` when the caller already has the training images')."""
        with self._timed("prepare"):
            train = train if train is not None else self.reader.dataset(list(data.train), progress, image_shape=image_shape)
            # `read`: an evaluator's validation images were just read by the trust check, and are not read twice
            self.use(train, self.reader.read(list(data.val), image_shape)[1:] if data.val else None)

    @contextmanager
    def _timed(self, what: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - wall
            self.seconds[f"{what}_cpu"] += time.process_time() - cpu

    def use(self, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Take the private training and validation images' (features, labels) as this space's reference."""
        self.train, self.val = train, val
        self._val_distances = None if val is None or not len(val[1]) else knn_distances(*val, *train).sqrt()

    def ceiling(self) -> tuple[float | None, int]:
        """The KNN judge's accuracy on the private validation images (each against the training images):
        the most it can confirm of perfect reconstructions."""
        if self.val is None or not len(self.val[1]):
            return None, 0
        return float(knn_judge_hits(*self.val, *self.train).double().mean()), len(self.val[1])

    def record(self) -> dict:
        """This space's entry in report.json's `feature_extractors`."""
        ceiling, n = self.ceiling()
        return {"extractor": self.extractor, "kind": self.kind, "source": self.source, "features": self.reader.feature_source,
                "dims": int(self.train[0].shape[1]) if self.train is not None and self.train[0].numel() else None,
                "trained_on": "public" if self.kind == PUBLIC else "private", "why": WHY[self.kind],
                "knn_judge_ceiling": ceiling, "knn_judge_ceiling_n": n, "histogram": self.histogram,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}  # fmt: skip


def feature_spaces(evaluators: list[Evaluator], evaluation_names: list[str], extractor: PublicExtractor | None,
                   runtime, batch_size: int) -> list[FeatureSpace]:  # fmt: skip
    """The public space first (when the prior file holds a discriminator), then the first evaluator's."""
    spaces = []
    if extractor is not None:
        reader = Evaluator(extractor.model, extractor.preprocessing, runtime, batch_size, output_features=True)
        spaces.append(FeatureSpace(extractor.name, PUBLIC, reader, extractor.source))
    spaces.append(FeatureSpace(f"evaluator {evaluation_names[0]}", EVALUATOR, evaluators[0]))
    return spaces


def kept_features(spaces: list[FeatureSpace], images: torch.Tensor, evaluator_features: torch.Tensor) -> list[torch.Tensor]:
    """Each space's features of the kept reconstructions [classes, images, C, H, W] -> [classes, images, D];
    the evaluator's space reuses `evaluator_features` ([classes x images, D]), already computed."""
    n, k = images.shape[:2]
    return [(s.features(images.flatten(0, 1)) if s.kind == PUBLIC else evaluator_features).view(n, k, -1) for s in spaces]


def _space_figures(space: FeatureSpace, f: torch.Tensor, classes: list[int],
                   evaluator_hits: np.ndarray) -> tuple[dict, list[dict], torch.Tensor, np.ndarray]:  # fmt: skip
    """One row's figures in one space: the metrics entry, one entry per class, each reconstruction's
    distance, and the KNN judge's [classes, images] hits."""
    n, k = f.shape[:2]
    train_f, train_y = space.train
    flat, labels = f.flatten(0, 1), torch.tensor(classes).repeat_interleave(k)
    summary = fidelity_summary({c: f[i] for i, c in enumerate(classes)}, {c: train_f[train_y == c] for c in classes},
                               extractor=space.extractor)  # fmt: skip
    hits = knn_judge_hits(flat, labels, train_f, train_y).view(n, k).numpy()
    agreement = judge_agreement(evaluator_hits, hits)
    distances = knn_distances(flat, labels, train_f, train_y).sqrt()
    pooled, share = summary["pooled"], agreement.rejected_share
    entry = {
        "extractor": space.extractor, "extractor_kind": space.kind, "dims": summary["dims"], "k": summary["k"],
        **{key: pooled[key] for key in (*METRICS, "fid_extrapolated", "fid_rank_deficient")},
        "class_mean": summary["class_mean"], "skipped": pooled["skipped"],
        "knn_judge_acc1": agreement.knn_judge_acc1.estimate, "knn_judge_acc1_interval": agreement.knn_judge_acc1.to_dict(),
        "evaluator_acc1": agreement.evaluator_acc1.estimate,
        "judge_disagreement": agreement.disagreement.estimate, "judge_disagreement_interval": agreement.disagreement.to_dict(),
        "false_positive_share": None if share is None else share.estimate,
        "false_positive_share_interval": None if share is None else share.to_dict(),
        "evaluator_minus_knn_judge": agreement.evaluator_minus_knn.estimate,
        "evaluator_minus_knn_judge_interval": agreement.evaluator_minus_knn.to_dict(),
        "judge_counts": agreement.counts, "knn_distance_median": float(distances.nanmedian()), "distance_histogram": None,
    }  # fmt: skip
    per_class = [{"extractor": space.extractor, **{key: r[key] for key in (*METRICS, "fid_rank_deficient")},
                  "knn_judge_acc1": float(hits[i].mean())} for i, r in enumerate(summary["per_class"])]  # fmt: skip
    return entry, per_class, distances, hits


def judge_parts(rows: list[list], parts: list[list[list]], classes: list[int], spaces: list[FeatureSpace]) -> None:
    """`judge_rows` for the runner's layout: `rows[model][attack]` judged from the ranks' `parts[model][attack]`
    (`mishield.audit.outcomes.ShardOutcome`s, whose `features` hold each space's kept-image features)."""
    if not spaces:
        return
    flat = [(row, p) for model_rows, model_parts in zip(rows, parts) for row, p in zip(model_rows, model_parts)]
    features = [[per_class(p, classes, lambda o, s=s: o.features[s]) for s in range(len(spaces))] for _, p in flat]
    judge_rows([row for row, _ in flat], features, classes, spaces)


def judge_rows(rows: list, features: list[list[torch.Tensor]], classes: list[int], spaces: list[FeatureSpace]) -> None:
    """Add every space's figures to each judging `Row` (in place): `metrics.feature_extractors`, the
    first space's KNN judge and false-positive share as flat `metrics` keys, and per class.

    `features[i][s]` is row i's [classes, images, D] features in space s (rows in any order). Each
    row's judge agreement is against that row's own (most leaky) evaluator. The histograms share
    one set of bins per space, over every row and the private validation images, so they compare.
    """
    with _one_thread():
        distances = [_judge_row(row, feats, classes, spaces) for row, feats in zip(rows, features)]
        for s, space in enumerate(spaces):
            _histograms(space, [row.metrics["feature_extractors"][s] for row in rows], [d[s] for d in distances])


@contextmanager
def _one_thread():
    """The figures are many small matrix operations: on a busy 2-core CPU, torch's thread pool made them
    over 40x costlier in CPU time than one thread (measured: 3.7 s against 0.08 s for three rows)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _judge_row(row, feats: list[torch.Tensor], classes: list[int], spaces: list[FeatureSpace]) -> list[torch.Tensor]:
    """One row's figures in every space (in place); returns each space's per-reconstruction distances."""
    entries, per_class, row_distances, knn_hits = [], [[] for _ in classes], [], []
    for space, f in zip(spaces, feats):
        with space._timed("figures"):
            entry, classes_entry, d, hits = _space_figures(space, f, classes, row.hits[row.evaluator])
        knn_hits.append(hits)
        entries.append(entry)
        row_distances.append(d)
        for slot, e in zip(per_class, classes_entry):
            slot.append(e)
    first = entries[0]
    row.metrics["feature_extractors"] = entries
    row.metrics |= {"knn_judge_extractor": first["extractor"],
                    **{key: first[key] for key in ("knn_judge_acc1", "knn_judge_acc1_interval", "judge_disagreement",
                                                  "judge_disagreement_interval", "false_positive_share",
                                                  "false_positive_share_interval")}}  # fmt: skip
    for r, slot in zip(row.per_class, per_class):
        r["knn_judge_acc1"] = slot[0]["knn_judge_acc1"]
        r["feature_extractors"] = slot
    # Every evaluator's own false-positive share, against the first space's judge: which one is fooled more.
    for summary, hits in zip(row.metrics.get("evaluators") or [], row.hits):
        share = rejected_share(hits, knn_hits[0])
        summary["false_positive_share"] = None if share is None else share.estimate
        summary["false_positive_share_interval"] = None if share is None else share.to_dict()
    return row_distances


def _histograms(space: FeatureSpace, entries: list[dict], distances: list[torch.Tensor]) -> None:
    """One set of bins from 0 to the largest distance seen (every row's and the validation images'), counts per row."""
    values = [d[~torch.isnan(d)] for d in distances] + ([space._val_distances] if space._val_distances is not None else [])
    top = max((float(v.max()) for v in values if v.numel()), default=0.0) or 1.0
    edges = torch.linspace(0.0, top, HISTOGRAM_BINS + 1, dtype=torch.float64)

    def counts(v: torch.Tensor) -> list[int]:
        v = v[~torch.isnan(v)]
        return torch.histc(v.double(), bins=HISTOGRAM_BINS, min=0.0, max=top).long().tolist() if v.numel() else [0] * HISTOGRAM_BINS

    for entry, d in zip(entries, distances):
        entry["distance_histogram"] = counts(d)
    val = space._val_distances
    space.histogram = {"edges": [round(float(e), 6) for e in edges], "distance": "L2 to the nearest private training image of the class",
                       "private_val": None if val is None else counts(val),
                       "private_val_median": None if val is None else float(val.median())}  # fmt: skip
