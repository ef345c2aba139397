"""Optimised values kept on disk, one file per request: an edit that stops (a killed process, a bench
that resumes in a later sitting) or runs again (another ``mom2_update_weight``, the same facts) does not
optimise a request's value twice. The value optimisation costs almost all of an edit (about 10 s a
request on SmolLM2-135M at one thread), the closed forms after it seconds.

A request's value depends on the model's weights, the module, the settings (not on which other requests
share its pass: ``values``), the context prefixes and the request's token sequences, so that is the key:
the weights by ``model_fingerprint`` (about 1 s for 135M parameters, taken once per call), the
sequences by their token ids (which also covers the tokenizer). ROME's sequential edits each see the
model holding the earlier ones, so a rerun finds every earlier edit's value under its own state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from flearning.editing.requests import EditRequest
    from flearning.editing.values import ValueSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueRow:
    """One request's optimised value: v* (or z) = ``init`` + ``delta``, its loss and NLL at every
    evaluation, the Adam steps taken."""

    target: torch.Tensor
    init: torch.Tensor
    delta: torch.Tensor
    losses: list[float]
    nll: list[float]
    steps: int


@dataclass(frozen=True)
class ValueCache:
    """A directory of optimised values (``<key>.safetensors``), e.g. the model cache's ``values/``."""

    directory: Path

    def keys(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        module: str,
        prefixes: Sequence[str],
        settings: ValueSettings,
    ) -> list[str]:
        """Each request's key on ``model`` as it is now (see the module's docstring)."""
        from flearning.editing.requests import kl_sequence, rewrite_sequence
        from flearning.models import model_fingerprint

        state = model_fingerprint(model)
        fixed = {
            k: v for k, v in dataclasses.asdict(settings).items() if k != "requests_per_pass"
        }  # memory only: every request's value is the same whatever the pass
        keys = []
        for request in requests:
            texts = [rewrite_sequence(tokenizer, request, 0, p) for p in ("", *prefixes)]
            kl = kl_sequence(tokenizer, request, 0)
            fields: dict[str, Any] = {
                "state": state,
                "module": module,
                "settings": fixed,
                "prefixes": list(prefixes),
                "rewrites": [[s.ids, list(s.targets), s.lookup, s.predict_from] for s in texts],
                "kl": [kl.ids, kl.lookup],
            }
            keys.append(hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:40])
        return keys

    def read(self, key: str) -> ValueRow | None:
        """The row stored under ``key``; None when absent or damaged (a damaged entry is recomputed)."""
        path = self.directory / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                tensors = {name: f.get_tensor(name) for name in ("target", "init", "delta")}
            return ValueRow(
                **tensors,
                losses=json.loads(meta["losses"]),
                nll=json.loads(meta["nll"]),
                steps=int(meta["steps"]),
            )
        except Exception as ex:
            log.warning("ignoring the damaged value cache entry %s (%s)", path, ex)
            return None

    def write(self, key: str, row: ValueRow) -> None:
        """Store ``row`` atomically; a failed write (a full disk) costs a recomputation next time only."""
        from safetensors.torch import save_file

        from flearning.io.atomic import atomic_write

        tensors = {"target": row.target, "init": row.init, "delta": row.delta}
        meta = {"losses": json.dumps(row.losses), "nll": json.dumps(row.nll), "steps": str(row.steps)}
        try:
            atomic_write(
                self.directory / f"{key}.safetensors",
                lambda tmp: save_file(
                    {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta
                ),
            )
        except OSError as ex:
            log.warning("could not cache an optimised value in %s: %s", self.directory, ex)
