"""Model loading and model files.

`load_model` reads every way a user can hand mishield a classifier (`loading`); architecture
specs are built by `architecture`; `introspect` finds a classifier's head and input contract;
`pickles` reads what a pickle would import without running it; `modelfile` writes and reads
mishield's own self-describing files; `filechecks` refuses what a file may not make mishield do
(run a program, call a factory it names, build from a damaged recipe, load NaN weights).
"""

from mishield.models.architecture import (
    build_architecture,
    import_factory,
    is_arch_spec,
)
from mishield.models.introspect import default_preprocessing, find_classifier
from mishield.models.loaded import LoadedModel
from mishield.models.loading import load_model
from mishield.models.modelfile import save_model
from mishield.models.pickles import scan_pickle_globals

__all__ = [
    "LoadedModel",
    "build_architecture",
    "default_preprocessing",
    "find_classifier",
    "import_factory",
    "is_arch_spec",
    "load_model",
    "save_model",
    "scan_pickle_globals",
]
