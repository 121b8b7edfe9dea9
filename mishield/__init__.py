"""mishield: harden image classifiers against model-inversion attacks, and prove it."""

__version__ = "0.1.0"
