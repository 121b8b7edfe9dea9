"""How a model expects its input: size and normalisation, recorded in every mishield file."""

from __future__ import annotations

from dataclasses import asdict, dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Input contract of a classifier: images in [0, 1], resized to `input_size`, then normalised."""

    input_size: tuple[int, int, int] = (3, 224, 224)  # (channels, height, width)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            input_size=tuple(int(v) for v in d.get("input_size", cls.input_size)),
            mean=tuple(float(v) for v in d.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in d.get("std", IMAGENET_STD)),
            interpolation=str(d.get("interpolation", "bilinear")),
        )

    def with_input_size(self, size: int | None) -> Preprocessing:
        """Square override of the spatial size (`--input-size`)."""
        if size is None:
            return self
        return Preprocessing((self.input_size[0], size, size), self.mean, self.std, self.interpolation)
