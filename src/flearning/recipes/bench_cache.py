"""The bench's content-addressed cache under ``<out>/cache`` (safetensors and JSON only).

    prime/<key>/        a primed model θ (model, tokenizer, prime.json; prime.json alone where a
                        shipped cache kept only its JSON files: θ is then retrained if a run needs it)
    forget/<key>/       a forgetting vector Δ_old (vector.json + vector.safetensors)
    runs/<key>.json     one finished run's per-record results (θ's own evaluation too)

Each key is a short hash of everything the product depends on (the keys below); a rerun, a λ sweep or
an added method finds what an earlier bench already made.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flearning.data.records import KnowledgeRecord
    from flearning.evaluation import EvalResult
    from flearning.training.config import TrainConfig


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (cache keys)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prime_key(
    base_fingerprint: str, records: Sequence[KnowledgeRecord], cfg: TrainConfig, threshold: float
) -> str:
    from flearning.data import records_hash

    return digest("prime", base_fingerprint, records_hash(records), cfg.model_dump(mode="json"), threshold)


def forget_key(theta_key: str, split: str, cfg: TrainConfig) -> str:
    """Δ_old of θ on a split: shared by every λ, and by the methods that forget alike."""
    return digest("forget", theta_key, split, cfg.model_dump(mode="json"))


def run_key(
    theta_key: str,
    records: Sequence[KnowledgeRecord],
    method: str,
    lam: float | None,
    learn: TrainConfig | None,
    forget: TrainConfig | None,
    *,
    generation: bool,
    fluency: bool,
    split: str,
    perplexity: dict[str, Any] | None = None,
    edit: dict[str, Any] | None = None,
    template: str = "plain",
) -> str:
    """A run's key. What was added to the evaluation later joins the key only when it is on (fluency:
    both Fluencies; ``perplexity``: its settings), so keys of runs without it stay as they were; so do
    ``edit``, the edit step's settings of a method with an editor (``EditPlan.to_json``; ``learn`` None),
    and ``template``, the prompt template of training and evaluation, when it is not ``plain``. Where a
    ZsRE file's old answers came from is in ``records`` (their ``target_old``)."""
    from flearning.data import records_hash

    extra: list[Any] = []
    if fluency:
        extra.append("fluency_sampled")  # fluency has meant greedy and top-5 sampled since issue #14
    if perplexity is not None:
        extra.append({"perplexity": perplexity})
    if edit is not None:
        extra.append({"edit": edit})
    if template != "plain":
        extra.append({"template": template})
    return digest(
        "run",
        theta_key,
        records_hash(records),
        method,
        lam,
        learn.model_dump(mode="json") if learn is not None else None,
        forget.model_dump(mode="json") if forget else None,
        generation,
        fluency,
        split,
        *extra,
    )


def primed_eval_key(
    theta_key: str,
    records: Sequence[KnowledgeRecord],
    *,
    generation: bool,
    perplexity: dict[str, Any] | None,
    template: str,
) -> str:
    """θ's own evaluation on the evaluated records (the primed row of the reports)."""
    from flearning.data import records_hash

    return digest("primed-eval", theta_key, records_hash(records), generation, perplexity, template)


@dataclass
class RunRecord:
    """One finished (dataset, seed, method, λ, split) run, as cached on disk."""

    dataset: str
    seed: int
    method: str
    lam: float | None
    split: str  # "eval" or "val"
    records: list[dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)
    perplexity: dict[str, Any] | None = None  # the model's perplexity on held-out text, when measured
    template: str | None = None  # the prompt template (None: a run cached before templates, plain)
    zsre_old: str | None = None  # a ZsRE dataset's old-answer field (pred or answers); None otherwise
    machine: dict[str, Any] | None = None  # where ``seconds`` were measured (run_record.machine_facts)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__

    def result(self) -> EvalResult:
        from flearning.evaluation import EvalResult

        return EvalResult(
            records=self.records,
            seed=self.seed,
            meta={
                "method": self.method,
                "lambda": self.lam,
                # how the run's prompts and old answers were read, when recorded (issue #11)
                **{k: v for k, v in (("template", self.template), ("zsre_old", self.zsre_old)) if v},
            },
            perplexity=self.perplexity,
        )


class Cache:
    """The cache directory's entries by key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def run_path(self, key: str) -> Path:
        return self.root / "runs" / f"{key}.json"

    def load_run(self, key: str) -> RunRecord | None:
        path = self.run_path(key)
        if not path.is_file():
            return None
        return RunRecord(**json.loads(path.read_text()))

    def save_run(self, key: str, run: RunRecord) -> None:
        from flearning.io.atomic import atomic_write_text

        atomic_write_text(self.run_path(key), json.dumps(run.to_json()))

    def primed_dir(self, key: str) -> Path:
        return self.root / "prime" / key

    def has_primed_model(self, key: str) -> bool:
        """θ's weights are here (not only its ``prime.json``, as in a cache shipped without them)."""
        path = self.primed_dir(key)
        return (path / "config.json").is_file() and any(path.glob("*.safetensors"))

    def vector_dir(self, key: str) -> Path:
        return self.root / "forget" / key
