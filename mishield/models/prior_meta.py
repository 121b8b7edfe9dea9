"""The metadata of a mishield prior file, checked before a generator is built from it.

A prior's safetensors header records how to rebuild its DCGAN (`mishield.models.dcgan`):
`{"format", "version", "config": {latent_dim, resolution, channels, width}, "training"}`. The
header is as untrusted as the rest of the file (docs/reliability.md): a key the generator does
not take, a missing config, a version that is not a number or a latent size of a trillion would
otherwise end as an internal error or an attempt to allocate terabytes. Each is refused with
one sentence (exit 3) before any tensor is allocated.
"""

from __future__ import annotations

from collections.abc import Mapping

from mishield.errors import BadInputError

# The generator's constructor arguments and the values `mishield prior train` can write.
RESOLUTIONS = (32, 64, 128, 256)
CHANNELS = (1, 3)
MAX_LATENT_DIM = 4096  # DCGANs use 100-512; the first layer holds latent_dim x 512 x 16 weights
MAX_WIDTH = 512  # every layer is capped at 512 channels, so a wider base adds nothing


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _damaged(path, what: str) -> BadInputError:
    return BadInputError(f"{path} has damaged prior metadata: {what}; re-create it with `mishield prior train`.")


def check_prior_meta(meta: Mapping, path, newest_version: int) -> dict:
    """`meta` as read from a prior's header, validated; returns its generator config."""
    version = meta.get("version", 0)
    if not _whole(version) or version < 0:
        raise _damaged(path, f"its version must be a whole number, got {version!r}")
    if version > newest_version:
        raise BadInputError(f"{path} was written by a newer mishield (prior format {version}); upgrade mishield.")
    config = meta.get("config")
    if not isinstance(config, Mapping):
        raise _damaged(path, "it has no generator config")
    expected = {"latent_dim", "resolution", "channels", "width"}
    unknown, missing = sorted(set(config) - expected), sorted(expected - set(config))
    if unknown or missing:
        parts = [f"unknown key(s) {', '.join(map(str, unknown))}"] if unknown else []
        parts += [f"missing key(s) {', '.join(missing)}"] if missing else []
        raise _damaged(path, "its generator config has " + " and ".join(parts))
    ranges = {
        "latent_dim": (lambda v: 1 <= v <= MAX_LATENT_DIM, f"a whole number from 1 to {MAX_LATENT_DIM}"),
        "resolution": (lambda v: v in RESOLUTIONS, "one of " + ", ".join(map(str, RESOLUTIONS))),
        "channels": (lambda v: v in CHANNELS, "1 or 3"),
        "width": (lambda v: 1 <= v <= MAX_WIDTH, f"a whole number from 1 to {MAX_WIDTH}"),
    }
    for key, (ok, allowed) in ranges.items():
        value = config[key]
        if not _whole(value) or not ok(value):
            raise _damaged(path, f"{key} must be {allowed}, got {value!r}")
    if meta.get("training") is not None and not isinstance(meta["training"], Mapping):
        raise _damaged(path, "its training record is not a mapping")
    return dict(config)
