"""Models: the embedded default and its cache (``embedded``), finding and loading (``loading``).

The face holds what the rest of f-learning uses; tests of the internals, and monkeypatches (which must
reach the module that calls the name), go to the submodule.
"""

from flearning.models.embedded import DEFAULT_MODEL, cache_root, ensure_embedded
from flearning.models.loading import (
    check_model_dir,
    count_parameters,
    load_model,
    model_fingerprint,
    prepare_tokenizer,
    resolve_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "cache_root",
    "check_model_dir",
    "count_parameters",
    "ensure_embedded",
    "load_model",
    "model_fingerprint",
    "prepare_tokenizer",
    "resolve_model",
]
