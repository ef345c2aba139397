"""What ``flearn update`` records about a run: ``run.json`` and the output's model card.

``run.json`` holds the resolved config, both stages' settings, the model and data (path, hash, counts),
library versions, timings, per-step losses and the metrics before and after; the model card
(``README.md``) summarises it for a reader of the output directory.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.config import StagePlan, UpdateConfig
from flearning.evaluation.results import perplexity_change
from flearning.methods import Method, get_method
from flearning.models.embedded import DEFAULT_MODEL
from flearning.models.loading import HUB_PREFIX
from flearning.recipes.work_dir import stages_json

if TYPE_CHECKING:
    from flearning.data import LoadedDataset
    from flearning.evaluation import EvalResult
    from flearning.recipes.algorithm import MethodOutcome


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ["f-learning", "torch", "transformers", "peft", "accelerate", "safetensors", "pydantic"]
    versions = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


# the CPU's vector instructions that decide fp32/bf16 matmul speed (what makes two hosts' timings differ)
SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def machine_facts(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """Where a run's timings were measured: platform, CPU model and its vector instructions, cores and
    torch's threads. On Linux the CPU comes from ``cpuinfo``; elsewhere ``platform.processor()``."""
    import os

    import torch

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in cpuinfo.read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and value.strip():
                cpu = value.strip()
            elif name.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def resumed_stages(work: Path | None) -> dict[str, str]:
    """What an earlier, interrupted process left in the work directory ``work`` for this run to reuse, per
    stage: a finished forget stage (Δ_old), a finished learning stage, or a stage's last checkpoint.
    Empty when nothing is reused (a fresh run): then ``timings_seconds`` cover the whole run."""
    from flearning.training.checkpoint import checkpoint_dirs

    if work is None:
        return {}
    done = "finished by an earlier process (its training time is not in timings_seconds)"
    resumed: dict[str, str] = {}
    if (work / "knowledge_vector" / "vector.json").is_file():
        resumed["forget"] = f"{done}; Δ_old read from the work directory"
    for stage in ("forget", "learn"):
        if stage in resumed:
            continue
        found = checkpoint_dirs(work / stage)
        if not found:
            continue
        step, final, _ = found[-1]
        resumed[stage] = (
            f"{done}; read from its final checkpoint (optimizer step {step})"
            if final
            else f"resumed from optimizer step {step}, saved by an earlier process (timings_seconds count "
            "only the steps after it)"
        )
    return resumed


def data_record(path: Path, dataset: LoadedDataset) -> dict[str, Any]:
    """One data file as ``run.json`` describes it (a table also by its reader and split: ``data.sources``;
    a ZsRE file by the field its old answers came from, ``zsre_old``)."""
    record = {
        "path": str(path),
        "format": dataset.format,
        "sha256": dataset.sha256,
        "records": len(dataset.records),
        "dropped": dataset.dropped,
    }
    if dataset.reader != "json":
        record.update(reader=dataset.reader, split=dataset.split)
    if dataset.zsre_old is not None:  # a ZsRE file: the field its old answers were read from
        record["zsre_old"] = dataset.zsre_old
    return record


def run_summary(
    cfg: UpdateConfig,
    method: Method,
    plan: StagePlan,
    *,
    model: dict[str, Any],
    data: dict[str, dict[str, Any]],
    timings: dict[str, float],
    outcome: MethodOutcome,
    before: EvalResult | None,
    after: EvalResult | None,
    resumed: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The content of ``run.json`` (also the model card's input and ``update``'s summary).

    ``model``: source, resolved path and fingerprint; ``data``: ``{"old", "new"}`` of ``data_record``
    (and how a split pair was joined, what was truncated); ``resumed``: stage → how it was resumed from
    the work of an earlier process (empty for a run done in one process). ``timings_seconds`` are this
    process's; when stages were resumed, ``timings_note`` says so.
    """
    resumed = dict(resumed or {})
    notes = {}
    if resumed:
        notes["timings_note"] = (
            "timings_seconds count this process only; the stages in 'resumed' ran partly or wholly in an "
            "earlier process, whose time is not included"
        )
    return {
        "method": method.name,
        "method_summary": method.summary,
        "lambda": cfg.lam if method.forget else None,
        "template": cfg.template,  # the prompt template of training and evaluation (data.templates)
        "config": cfg.model_dump(mode="json", by_alias=True),
        "stages": stages_json(method, plan),
        "model": model,
        "data": data,
        "seed": cfg.seed,
        "versions": library_versions(),
        "machine": machine_facts(),
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
        **notes,
        "resumed": resumed,
        # how the learning stage ended: epochs trained and kept, accuracy (and Locality) per epoch
        "learn_schedule": outcome.learn.to_json(plan.stop) if outcome.learn is not None else None,
        # an editor's step instead (ROME, MEMIT, AlphaEdit): facts, batches, the value optimisation's loss
        **({"edit": outcome.edit.to_json()} if outcome.edit is not None else {}),
        "tokens": outcome.tokens,
        "final_loss": {k: (v[-1] if v else None) for k, v in outcome.losses.items()},
        # each stage's loss at every optimizer step: a resumed run's trace equals an uninterrupted one's
        "losses": outcome.losses,
        "metrics_before": before.summary() if before else None,
        "metrics_after": after.summary() if after else None,
        # Locality and Portability by probe category (KnowEdit data only)
        **_by_category(before, after),
        # general ability: perplexity on held-out text before and after (None: not measured)
        "perplexity": perplexity_change(before, after),
    }


def _by_category(before: EvalResult | None, after: EvalResult | None) -> dict[str, Any]:
    """``metrics_by_category_before`` / ``_after`` when the facts' probes have categories, else nothing."""
    out = {}
    for key, result in (("metrics_by_category_before", before), ("metrics_by_category_after", after)):
        categories = result.category_summary() if result is not None else {}
        if categories:
            out[key] = categories
    return out


def _fmt(metrics: dict[str, Any] | None, name: str) -> str:
    if not metrics or name not in metrics or metrics[name].get("mean") is None:
        return "–"
    return f"{metrics[name]['mean']:.1f}"


def _mean(metrics: dict[str, Any] | None, name: str) -> float | None:
    return ((metrics or {}).get(name) or {}).get("mean")


def _change(before: dict[str, Any] | None, after: dict[str, Any] | None, name: str) -> str:
    b, a = _mean(before, name), _mean(after, name)
    return "" if a is None or b is None else f"{a - b:+.1f}"


def shown_path(path: str | None) -> str | None:
    """A path as a model card shows it: a shipped sample as ``sample:NAME`` (which every command reads,
    wherever the package is installed), anything else as it was given."""
    from flearning.resources import SAMPLE_PREFIX, samples_dir

    if not path:
        return path
    given = Path(path)
    try:
        if given.is_file() and given.parent.resolve() == samples_dir().resolve():
            return SAMPLE_PREFIX + given.name
    except OSError:
        pass
    return path


# A hub repository id (huggingface_hub's rule: [org/]name of word characters, '-', '.'; no '--' or '..'),
# and a file inside a snapshot of the Hugging Face cache (models--org--name/snapshots/<revision>/...).
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_HUB_CACHE = re.compile(r"(?:^|/)(models|datasets)--([\w.-]+)/snapshots/")


def _hub_id(spec: str | None, kind: str) -> str | None:
    """The hub id that a run's model or data was given as (``hf:org/name``; ``org/name`` naming nothing
    local; a file in the Hugging Face cache's snapshot of a ``kind``: models or datasets), else None."""
    if not spec:
        return None
    if spec.startswith(HUB_PREFIX):
        spec = spec.removeprefix(HUB_PREFIX)
        return spec if _HUB_ID.match(spec) or re.match(r"^[\w.-]+$", spec) else None
    cached = _HUB_CACHE.search(spec.replace("\\", "/"))
    if cached is not None and cached.group(1) == kind:
        return cached.group(2).replace("--", "/", 1)
    if _HUB_ID.match(spec) and ".." not in spec and "--" not in spec and not Path(spec).expanduser().exists():
        return spec
    return None


def base_model(summary: dict[str, Any]) -> tuple[str | None, str | None, str]:
    """The model an update started from, for its model card: (hub id or None, its licence or None, how
    the body names it). The embedded model names the hub model it was quantized from."""
    from flearning.models.embedded import EMBEDDED_MODELS

    source = summary["model"].get("source") or DEFAULT_MODEL
    embedded = EMBEDDED_MODELS.get(source)
    if embedded is not None:
        described = (
            f"`{source}`, the embedded {embedded.description} (the GGUF `{embedded.gguf_file}` dequantized "
            f"to fp32); `base_model` names the model it was quantized from"
        )
        return embedded.hub_id, embedded.license, described
    hub = _hub_id(source, "models") or _hub_id(summary["model"].get("path"), "models")
    return hub, None, f"[`{hub}`](https://huggingface.co/{hub})" if hub else f"`{source}` (a local model)"


def _command_value(key: str, value: Any) -> str:
    """``key=value`` as ``flearn update`` parses it back to ``value`` (plain when it does, else JSON,
    which YAML reads alike), quoted for a POSIX shell."""
    import json
    import shlex

    from flearning.config import parse_overrides

    if isinstance(value, str):
        value = shown_path(value)
    pair = f"{key}={value}" if isinstance(value, str) else f"{key}={json.dumps(value)}"
    tree, problems = parse_overrides([pair])
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    if problems or tree != value:
        pair = f"{key}={json.dumps(value)}"
    return shlex.quote(pair)


def update_command(config: dict[str, Any]) -> str:
    """A ``flearn update`` command line with a run's settings (``run.json``'s resolved config): the model,
    the data, the method and λ, then every setting that differs from its default (not ``overwrite``)."""
    defaults = UpdateConfig().model_dump(mode="json", by_alias=True)
    always = ("model", "data", "old", "new", "method", "lambda")

    def leaves(tree: dict[str, Any], base: dict[str, Any], prefix: str = ""):
        for key, value in tree.items():
            default = base.get(key) if isinstance(base, dict) else None
            if isinstance(value, dict):
                yield from leaves(value, default or {}, f"{prefix}{key}.")
            elif value is not None and (value != default or f"{prefix}{key}" in always):
                yield f"{prefix}{key}", value

    pairs = dict(leaves(config, defaults))
    pairs.pop("overwrite", None)
    if not get_method(config.get("method", defaults["method"])).forget:
        pairs.pop("lambda", None)
    order = [k for k in always if k in pairs] + [k for k in pairs if k not in always]
    return "flearn update " + " ".join(_command_value(k, pairs[k]) for k in order)


def _datasets(data: dict[str, Any]) -> list[str]:
    """The hub datasets a run's facts came from (none for local files)."""
    found = []
    for part in ("old", "new"):
        entry = data.get(part) or {}
        hub = _hub_id(entry.get("path"), "datasets")
        if hub is not None and hub not in found:
            found.append(hub)
    return found


def _metrics_section(summary: dict[str, Any]) -> str:
    from flearning.evaluation.definitions import METRIC_LABELS

    before, after = summary.get("metrics_before"), summary.get("metrics_after")
    if before is None or after is None:  # the report is written exactly when both are there
        return (
            "The before/after evaluation was skipped (`--no-eval`, `evaluate: false`), so this directory has no\n"
            "`report/`: score the model with `flearn eval`."
        )
    rows = "\n".join(
        f"| {METRIC_LABELS.get(n, n)} | {_fmt(before, n)} | {_fmt(after, n)} | {_change(before, after, n)} |"
        for n in after or before
        if _mean(before, n) is not None or _mean(after, n) is not None  # Fluency only when measured
    )
    return f"""On the {_facts(summary["data"])} facts of the update, before (the base model) and after (this model):

| metric (×100) | before | after | change |
|---|---:|---:|---:|
{rows}

Metrics are teacher-forced token accuracies unless named otherwise; Locality compares this model's argmax
predictions with the base model's on unrelated prompts (definitions in `report/summary.md`).{_perplexity_line(summary)}"""


def _perplexity_line(summary: dict[str, Any]) -> str:
    """General ability before and after, in a sentence for the model card ("" when not measured)."""
    ppl = summary.get("perplexity")
    if not ppl or ppl.get("before") is None or ppl.get("after") is None:
        return ""
    return (
        f"\n\nGeneral ability: perplexity on {ppl['passages']} passages of held-out text (`{ppl['corpus']}`; lower\n"
        f"is better) {ppl['before']:.2f} before, {ppl['after']:.2f} after ({ppl['change']:+.2f})."
    )


def _facts(data: dict[str, Any]) -> int:
    return data.get("facts", data["new"]["records"])


def model_card(summary: dict[str, Any]) -> str:
    """The output directory's ``README.md``: a Hugging Face model card. Its metadata (``base_model`` when
    the model came from the hub or is the embedded one, ``license`` when known, ``datasets`` when the
    facts came from the hub, ``tags`` naming the method) is rendered and checked by huggingface_hub's
    ``ModelCardData``; the body gives the method and λ, the data, the metrics before and after, the
    learning stage, how to load the model and the command that made it."""
    from huggingface_hub import ModelCard, ModelCardData

    method, lam, data, config = summary["method"], summary.get("lambda"), summary["data"], summary["config"]
    hub_id, licence, described = base_model(summary)
    formats = {(data.get(p) or {}).get("format") or "" for p in ("old", "new")}
    tags = ["f-learning", "knowledge-editing", "model-editing", method]
    tags += sorted({f.removesuffix("-rome") for f in formats if f.startswith(("zsre", "counterfact"))})
    card_data = ModelCardData(
        base_model=hub_id,
        library_name="transformers",
        license=licence,
        pipeline_tag="text-generation",
        datasets=_datasets(data) or None,
        tags=tags,
    )
    lam_text = f", λ = {lam}" if lam is not None else ""
    lam_line = (
        f"- **λ**: {lam} (the forget stage's knowledge vector Δ_old of the old facts is subtracted, "
        f"θ' = θ − {lam}·Δ_old, before the new facts are {'learned' if not summary.get('edit') else 'written'})\n"
        if lam is not None
        else ""
    )
    old, new = data["old"], data["new"]
    facts = (
        f"`{shown_path(old['path'])}` ({old['records']} records, format {old['format']}, sha256 "
        f"{old['sha256'][:12]}…)"
    )
    if new["path"] != old["path"] or new.get("sha256") != old.get("sha256"):
        facts = (
            f"old facts {facts}; new facts `{shown_path(new['path'])}` ({new['records']} records, format "
            f"{new['format']}, sha256 {new['sha256'][:12]}…)"
        )
    schedule = summary.get("learn_schedule") or {}
    learned = ""
    if schedule.get("history"):
        accuracy = ", ".join(f"{100 * r['accuracy']:.0f}" for r in schedule["history"])
        learned = (
            f"\nLearning stage: {schedule['epochs_trained']} epochs, kept epoch {schedule['kept_epoch']}; it "
            f"{schedule['why']}. Accuracy on the new facts after each epoch (×100): {accuracy}.\n"
        )
    vectors = ""
    edit = summary.get("edit")
    if config.get("save_vectors", True):
        vectors = (
            "\n`update_vector/` replays the update on the base model (`flearn vector apply --add 1`)"
            + ("; `knowledge_vector/` is Δ_old of the old facts" if lam is not None else "")
            + ("; `edit_vector/` is the edit ΔW alone" if edit else "")
            + ".\n"
        )
    how = (
        "the old facts are forgotten before the new ones are learned (F-Learning)"
        if edit is None
        else (
            f"the new facts were written by {edit['editor']} into layers {edit['layers']}"
            + (", after the old facts were forgotten (F-Learning)" if lam is not None else "")
        )
    )
    out = config.get("out") or "."
    reference = summary["model"].get("source") or DEFAULT_MODEL
    body = f"""# {summary["model"].get("source")} updated with `{method}`{lam_text}

This model is a copy of a causal language model whose facts were updated with
[f-learning](https://pypi.org/project/f-learning/) {summary["versions"].get("f-learning")}: {how}.

- **Base model**: {described}
- **Method**: `{method}`: {summary["method_summary"]}
{lam_line}- **Facts**: {facts}; seed {summary["seed"]}
{learned}
## Evaluation

{_metrics_section(summary)}

## How to use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "{out}"  # this directory, or its hub id once uploaded
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
inputs = tokenizer("The capital of France is", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
print(tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))
```

See the change, prompt by prompt (greedy continuations before | after):

```bash
{_shell_line("flearn generate", "--model", out, "--reference", reference, *_data_options(config, new), "--limit", "5")}
```
{vectors}
## How it was made

```bash
{update_command(config)}
```

`run.json` holds the resolved configuration, the library versions, the timings and every step's loss.
"""
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")  # parses and checks the metadata again
    return str(card)


def _data_options(config: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """``--data`` (with ``--split`` and ``--field`` when the run used them) to read the new facts again."""
    options = ["--data", shown_path(data["path"]) or ""]
    if config.get("split"):
        options += ["--split", str(config["split"])]
    if config.get("fields"):
        options += ["--field", ",".join(f"{k}={v}" for k, v in config["fields"].items())]
    return options


def _shell_line(command: str, *args: str) -> str:
    import shlex

    return " ".join([command, *(shlex.quote(str(a)) for a in args)])
