"""The ``edit:`` section of ``flearn update`` and ``flearn bench``: how ROME, MEMIT and AlphaEdit write the
new facts (``flearning.editing``, docs/EDITING.md), and ``EditPlan``, the resolved settings of one
method's edit step (``StagePlan.edit``).

Every default the algorithms take comes from ``flearning.editing`` (their one home); what is decided
here is the layers edited on the embedded model and which settings a method reads. ``EditPlan.to_json``
holds only the settings the method's editor reads, so changing AlphaEdit's threshold never invalidates
a cached MEMIT run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flearning.editing.alphaedit import ALPHAEDIT_VALUES, L2, NULLSPACE_THRESHOLD
from flearning.editing.covariance import DEFAULT_CORPUS
from flearning.editing.memit import MOM2_UPDATE_WEIGHT
from flearning.editing.values import ValueSettings
from flearning.errors import FlearnError
from flearning.methods import Method
from flearning.resources import SAMPLE_PREFIX, resolve_sample
from flearning.training.config import ConfigBool, ConfigFloat, ConfigInt

# The layers edited by default, chosen for the embedded SmolLM2-135M (Llama-shaped, 30 layers) by a
# layer sweep on CounterFact validation records 200+ (benchmarks/editing_layers.py, results in
# benchmarks/results/editing-layers.json, docs/EDITING.md "Layers for SmolLM2-135M"). ROME: layers 1, 3,
# 5, 8 and 12 all reached Efficacy, Paraphrase score and Locality 100 on 6 single edits; layer 12 had
# the highest Generality (83 against 50-67), so 12 (40% of the depth, as ROME's layer 17 of GPT-2 XL's
# 48). MEMIT (and AlphaEdit, which shares its loop): on 30 edits in one batch, layers 3-7 reached
# Efficacy 83 against 80 for the paper's 4-8 (Reliability 62 against 52, Locality 87 both).
ROME_LAYERS: tuple[int, ...] = (12,)
MEMIT_LAYERS: tuple[int, ...] = (3, 4, 5, 6, 7)
DEFAULT_LAYERS = {"rome": ROME_LAYERS, "memit": MEMIT_LAYERS, "alphaedit": MEMIT_LAYERS}
# C's token budget: the reference's 100,000 Wikipedia articles are far more; the shipped WikiText-2 sample
# has about 40,000 tokens of SmolLM2's tokenizer, all of which this reads
COVARIANCE_TOKENS = 100_000
COVARIANCE_MAX_LENGTH = 512  # each corpus text cut there (or at the model's context, when shorter)

LayerIndex = Annotated[ConfigInt, Field(ge=0)]


class ValueOverrides(BaseModel):
    """The value optimisation (ROME's v*, MEMIT's and AlphaEdit's z; ``editing.values``). Left out, each
    editor's own default: ``lr`` 0.5, ``weight_decay`` 1e-3, ``clamp_norm_factor`` 4 for ROME and MEMIT
    (EasyEdit's LLaMA-7B hparams); 0.1, 0.5, 0.75 for AlphaEdit (its Llama3-8B hparams)."""

    model_config = ConfigDict(extra="forbid")

    steps: ConfigInt = Field(ValueSettings.steps, ge=1)
    lr: ConfigFloat | None = Field(None, gt=0)
    kl_factor: ConfigFloat = Field(ValueSettings.kl_factor, ge=0)
    weight_decay: ConfigFloat | None = Field(None, ge=0)
    clamp_norm_factor: ConfigFloat | None = Field(None, gt=0)


class EditSettings(BaseModel):
    """How the editors write the new facts (read by ``rome``, ``memit``, ``alphaedit`` and the
    ``flearning-*`` methods that edit; ignored by the others).

    ``layers``: the edited layers (ROME takes one; default ROME [12], MEMIT and AlphaEdit [3..7]).
    ``corpus``: the text C = E[k kᵀ] is measured on (a text file, a ``save_to_disk`` directory with a
    ``text`` column, or ``sample:NAME``), its first ``covariance_tokens`` tokens; cached under the model
    cache's ``covariance/``. ``mom2_adjustment``: ROME's u = C⁻¹k* (false: u = k*).
    ``mom2_update_weight``: MEMIT's λ. ``nullspace_threshold`` and ``l2``: AlphaEdit's. ``batch_size``:
    facts per MEMIT/AlphaEdit batch, batches edited one after the other (None: all in one batch, as the
    papers; ROME always edits one fact after the other).
    """

    model_config = ConfigDict(extra="forbid")

    layers: list[LayerIndex] | None = Field(None, min_length=1)
    corpus: str = Field(DEFAULT_CORPUS, min_length=1)
    covariance_tokens: ConfigInt = Field(COVARIANCE_TOKENS, ge=1)
    mom2_adjustment: ConfigBool = True
    mom2_update_weight: ConfigFloat = Field(MOM2_UPDATE_WEIGHT, gt=0)
    nullspace_threshold: ConfigFloat = Field(NULLSPACE_THRESHOLD, gt=0)
    l2: ConfigFloat = Field(L2, gt=0)
    values: ValueOverrides = Field(default_factory=ValueOverrides)
    batch_size: ConfigInt | None = Field(None, ge=1)

    @field_validator("layers")
    @classmethod
    def _each_once(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"each layer may be given once, not {value}")
        return value

    @field_validator("corpus", mode="before")
    @classmethod
    def _corpus(cls, value: Any) -> Any:
        if not isinstance(value, str) and hasattr(value, "__fspath__"):
            value = str(value)
        if isinstance(value, str) and value.startswith(SAMPLE_PREFIX):
            try:
                resolve_sample(value)  # a missing shipped sample is a problem of this field
            except FlearnError as ex:
                raise ValueError(str(ex)) from None
        return value


def layer_problem(methods: list[str], settings: EditSettings) -> str | None:
    """Why ``settings.layers`` cannot serve ``methods`` (ROME edits exactly one layer), else None."""
    from flearning.methods import METHODS

    rome = [m for m in methods if m in METHODS and METHODS[m].editor == "rome"]
    if rome and settings.layers is not None and len(settings.layers) != 1:
        return (
            f"{rome[0]} edits one layer, not {settings.layers}: give one layer (edit.layers=[12]), or leave "
            "edit.layers out for each editor's default (ROME [12], MEMIT and AlphaEdit [3..7])"
        )
    return None


@dataclass(frozen=True)
class EditPlan:
    """The resolved settings of one method's edit step: its editor, the layers and what that editor
    reads (the others' settings are not part of it)."""

    editor: str  # rome, memit, alphaedit
    layers: tuple[int, ...]
    corpus: str
    covariance_tokens: int
    values: dict[str, float | int] = field(default_factory=dict)  # ValueSettings' fields
    mom2_adjustment: bool = True  # rome
    mom2_update_weight: float | None = None  # memit
    nullspace_threshold: float | None = None  # alphaedit
    l2: float | None = None  # alphaedit
    batch_size: int | None = None  # memit, alphaedit (None: one batch)

    def to_json(self) -> dict[str, Any]:
        """The settings this editor reads (run.json, cache keys, the edit vector's provenance)."""
        out: dict[str, Any] = {
            "editor": self.editor,
            "layers": list(self.layers),
            "corpus": self.corpus,
            "covariance_tokens": self.covariance_tokens,
        }
        if self.editor == "rome":
            out["mom2_adjustment"] = self.mom2_adjustment
        elif self.editor == "memit":
            out["mom2_update_weight"] = self.mom2_update_weight
        else:
            out.update(nullspace_threshold=self.nullspace_threshold, l2=self.l2)
        if self.editor != "rome":
            out["batch_size"] = self.batch_size
        out["values"] = dict(self.values)
        return out


def edit_plan(method: Method, settings: EditSettings) -> EditPlan | None:
    """The edit step of ``method`` (None for a method that learns by fine-tuning)."""
    editor = method.editor
    if editor is None:
        return None
    base = ALPHAEDIT_VALUES if editor == "alphaedit" else ValueSettings()
    given = settings.values
    values = {
        "steps": given.steps,
        "lr": given.lr if given.lr is not None else base.lr,
        "weight_decay": given.weight_decay if given.weight_decay is not None else base.weight_decay,
        "clamp_norm_factor": (
            given.clamp_norm_factor if given.clamp_norm_factor is not None else base.clamp_norm_factor
        ),
        "kl_factor": given.kl_factor,
    }
    return EditPlan(
        editor=editor,
        layers=tuple(settings.layers) if settings.layers is not None else DEFAULT_LAYERS[editor],
        corpus=settings.corpus,
        covariance_tokens=settings.covariance_tokens,
        values=values,
        mom2_adjustment=settings.mom2_adjustment,
        mom2_update_weight=settings.mom2_update_weight if editor == "memit" else None,
        nullspace_threshold=settings.nullspace_threshold if editor == "alphaedit" else None,
        l2=settings.l2 if editor == "alphaedit" else None,
        batch_size=settings.batch_size if editor != "rome" else None,
    )
