"""Cross-check of ``flearning.editing`` against EasyEdit's own ROME and MEMIT (issue #12).

The same CounterFact records, the same model (the embedded SmolLM2-135M), the same layer and value
optimisation settings go through our ``rome_edit``/``memit_edit`` and through EasyEdit's
``execute_rome``/``execute_memit``, run from a checkout or extract of EasyEdit's source that the user
made (``--easyedit DIR``; nothing of EasyEdit is vendored into this repository). The weight changes are
then compared: cosine of the flattened ΔW, ratio of Frobenius norms, cosine of ROME's left vector u and
of the value change written (v* − W k), and the target's NLL on the edited prompt after each edit.

What is controlled, and how (EasyEdit's algorithm code runs unmodified):

- Hyper-parameters: EasyEdit's own ``hparams/ROME/llama-7b.yaml`` and ``hparams/MEMIT/llama-7b.yaml``
  (layer 5, resp. 4-8; 25 steps, lr 0.5, KL 0.0625, weight decay 1e-3, clamp 4, λ 15000), with only the
  model-specific fields replaced: ``v_loss_layer`` = the model's last layer (31 of LLaMA-7B), CPU, the
  statistics directory; ``mom2_adjustment`` per variant (their LLaMA file has it off).
- Context templates: EasyEdit samples them from the model (``get_context_templates``) and caches them in
  the module global ``CONTEXT_TEMPLATES_CACHE``; that cache is set to ours (``"{}"`` and
  ``prefix + "{}"`` for each of ``CONTEXT_PREFIXES``, grouped as MEMIT groups them), so both average
  keys and optimise values over the same six texts. ``--sampled-templates`` also runs EasyEdit's ROME
  with its own sampled templates (seeded), which measures our deviation 1 (docs/EDITING.md).
- C: our C = E[k kᵀ] (the shipped WikiText sample, 100k tokens, cached) is written in EasyEdit's cache
  format (``runningstats.SecondMoment`` state in ``<stats_dir>/<model>/<dataset>_stats/<module>_float32_
  mom2_<n>.npz``), which ``layer_stats`` loads instead of sampling Wikipedia; that EasyEdit really used
  it is checked (its cached inverse times our C is the identity).

    nice -n 5 .venv/bin/python benchmarks/easyedit_crosscheck.py --easyedit /path/to/EasyEdit \\
        [--data ../shared/data/counterfact/counterfact-val.json] [--start 200] [--n 5] \\
        [--memit-n 3] [--sampled-templates] [--rome-layer 5] [--memit-layers 4 5 6 7 8] \\
        [--easyedit-commit HASH]

A checkout is ``git clone https://github.com/zjunlp/EasyEdit``; an extract of a given commit works as well
(then pass ``--easyedit-commit``). Needs only torch, transformers, numpy, PyYAML, matplotlib and datasets
(EasyEdit's ROME modules import the last two), all in the project's environment.

Writes benchmarks/results/easyedit-crosscheck.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "counterfact" / "counterfact-val.json"
STATS_DATASET = "flearning-wikitext-sample"  # the name under which our C sits in EasyEdit's stats dir
ROME_HPARAMS = "hparams/ROME/llama-7b.yaml"
MEMIT_HPARAMS = "hparams/MEMIT/llama-7b.yaml"


# --- EasyEdit, imported from the user's checkout --------------------------------------------------


def import_easyedit(root: Path) -> dict[str, types.ModuleType]:
    """EasyEdit's ROME and MEMIT modules from ``root`` (a checkout or extract of its repository).

    ``easyeditor/__init__.py`` and ``easyeditor/models/__init__.py`` import every method EasyEdit has
    (and their dependencies: sentence-transformers, higher, ...); only the packages' *paths* are
    registered here, so that ``easyeditor.models.rome`` and ``easyeditor.models.memit`` import their own
    files and the utilities they name, unchanged, without those package initialisers."""
    if not (root / "easyeditor" / "models" / "rome" / "rome_main.py").is_file():
        raise SystemExit(
            f"--easyedit {root}: no easyeditor/models/rome/rome_main.py there (EasyEdit's source)"
        )
    for name, sub in (
        ("easyeditor", "easyeditor"),
        ("easyeditor.models", "easyeditor/models"),
        ("easyeditor.util", "easyeditor/util"),
    ):
        package = types.ModuleType(name)
        package.__path__ = [str(root / sub)]
        sys.modules[name] = package
    names = {
        "rome_main": "easyeditor.models.rome.rome_main",
        "rome_hparams": "easyeditor.models.rome.rome_hparams",
        "compute_u": "easyeditor.models.rome.compute_u",
        "compute_v": "easyeditor.models.rome.compute_v",
        "memit_main": "easyeditor.models.memit.memit_main",
        "memit_hparams": "easyeditor.models.memit.memit_hparams",
        "runningstats": "easyeditor.util.runningstats",
    }
    return {key: importlib.import_module(module) for key, module in names.items()}


def easyedit_commit(root: Path, given: str | None) -> str:
    if given:
        return given
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout; pass --easyedit-commit)"


def write_easyedit_stats(ee, model, stats_dir: Path, module: str, moment: torch.Tensor, n: int) -> Path:
    """Our C in EasyEdit's ``layer_stats`` cache, at the path ``layer_stats`` builds, written by its own
    ``runningstats.save_cached_state``: the ``CombinedStat(mom2=SecondMoment())`` state, whose
    ``moment()`` is ``mom2 / count``, holding mom2 = C and count = 1 (so EasyEdit reads our float32 C bit
    for bit), with the ``sample_size`` that ``tally`` checks."""
    stats = ee["runningstats"]
    model_name = model.config._name_or_path.rsplit("/")[-1]
    path = stats_dir / model_name / f"{STATS_DATASET}_stats" / f"{module}_float32_mom2_{n}.npz"
    stat = stats.CombinedStat(mom2=stats.SecondMoment())
    stat.mom2.mom2 = moment.float().cpu().clone()
    stat.mom2.count = 1
    stats.save_cached_state(str(path), stat, {"sample_size": n})
    return path


def quiet(log: list[str]):
    """EasyEdit prints its progress; keep it for the log (and the loss lines) instead of the terminal."""

    @contextlib.contextmanager
    def manager():
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            yield
        log.append(buffer.getvalue())

    return manager()


LOSS_LINE = re.compile(r"^loss (\S+) = (\S+) \+ (\S+) \+ (\S+) avg prob", re.MULTILINE)


def easyedit_losses(text: str) -> list[float]:
    return [float(m.group(1)) for m in LOSS_LINE.finditer(text)]


# --- measurements -------------------------------------------------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def norm_ratio(theirs: torch.Tensor, ours: torch.Tensor) -> float:
    return float(theirs.double().norm() / ours.double().norm())


def relative_difference(theirs: torch.Tensor, ours: torch.Tensor) -> float:
    return float((theirs.double() - ours.double()).norm() / ours.double().norm())


def target_nll(model, tokenizer, prompt: str, target: str) -> float:
    """Mean per-token NLL of ``target`` after ``prompt`` (the project's encoding and metric)."""
    from flearning.data.encoding import encode_pair
    from flearning.evaluation.metrics import mean_target_nll

    pair = encode_pair(tokenizer, prompt, target)
    ids = torch.tensor([pair.input_ids])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, pair.prompt_len :] = True
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return float(mean_target_nll(logits, ids, mask)[0])


def nlls_with(model, tokenizer, deltas: dict[str, torch.Tensor], record: dict) -> dict[str, float]:
    """NLL of the new and of the old object on the edit prompt with ``deltas`` applied (then removed)."""
    from flearning.editing import apply_deltas
    from flearning.editing.deltas import original_weights

    with original_weights(model, list(deltas)):
        apply_deltas(model, deltas)
        new = target_nll(model, tokenizer, record["prompt"], record["target_new"])
        old = target_nll(model, tokenizer, record["prompt"], record["ground_truth"])
    return {"nll_new": new, "nll_old": old, "prefers_new": new < old}


def as_easyedit_request(record: dict) -> dict:
    """The request as EasyEdit's editor passes it: prompt (with the subject), subject, target_new."""
    return {
        "prompt": record["prompt"],
        "subject": record["subject"],
        "target_new": record["target_new"],
        "ground_truth": record["ground_truth"],
        "case_id": record.get("case_id"),
    }


# --- ROME ---------------------------------------------------------------------------------------


def rome_pair(model, tokenizer, ee, hparams, record, covariance, log) -> dict:
    """One record through our ROME and EasyEdit's, compared."""
    from flearning.editing import rome_edit
    from flearning.editing.values import ValueSettings

    layer = hparams.layers[0]
    values = ValueSettings(
        steps=hparams.v_num_grad_steps,
        lr=hparams.v_lr,
        weight_decay=hparams.v_weight_decay,
        clamp_norm_factor=hparams.clamp_norm_factor,
        kl_factor=hparams.kl_factor,
    )
    start = time.perf_counter()
    ours = rome_edit(
        model,
        tokenizer,
        record,
        layer,
        covariance=covariance,
        mom2_adjustment=hparams.mom2_adjustment,
        values=values,
    )
    ours_s = time.perf_counter() - start
    (name, ours_dw), *_ = ours.deltas.items()

    weight = model.get_parameter(name)
    before = weight.detach().clone()
    start = time.perf_counter()
    with quiet(log):
        deltas = ee["rome_main"].execute_rome(model, tokenizer, as_easyedit_request(record), hparams)
    theirs_s = time.perf_counter() - start
    their_losses = easyedit_losses(log[-1])
    if not torch.equal(before, weight):
        raise SystemExit("EasyEdit's execute_rome left the model changed")
    left, right = deltas[name]
    theirs_dw = ee["rome_main"].upd_matrix_match_shape(left.unsqueeze(1) @ right.unsqueeze(0), weight.shape)
    # EasyEdit's own k and W k at the subject of the prompt alone (compute_v's helper)
    template = record["prompt"].replace(record["subject"], "{}")
    k_theirs, _ = ee["compute_v"].get_module_input_output_at_word(
        model,
        tokenizer,
        layer,
        context_template=template,
        word=record["subject"],
        module_template=hparams.rewrite_module_tmp,
        fact_token_strategy=hparams.fact_token,
    )
    residual_theirs = theirs_dw.double() @ k_theirs.double()  # = v*_theirs − W k
    residual_ours = (ours.value - ours.output).double()
    return {
        "case_id": record.get("case_id"),
        "prompt": record["prompt"],
        "target_new": record["target_new"],
        "cos_dW": cosine(theirs_dw, ours_dw),
        "norm_ratio_dW": norm_ratio(theirs_dw, ours_dw),
        "rel_diff_dW": relative_difference(theirs_dw, ours_dw),
        "norm_dW_ours": float(ours_dw.double().norm()),
        "norm_dW_theirs": float(theirs_dw.double().norm()),
        "cos_u": cosine(left, ours.u),
        "cos_key": cosine(k_theirs, ours.key),
        "cos_value_change": cosine(residual_theirs, residual_ours),
        "norm_ratio_value_change": norm_ratio(residual_theirs, residual_ours),
        "loss_final_ours": ours.values.losses[0][-1],
        "loss_final_theirs": their_losses[-1] if their_losses else None,
        "evaluations_ours": len(ours.values.losses[0]),
        "evaluations_theirs": len(their_losses),
        "nll_before": target_nll(model, tokenizer, record["prompt"], record["target_new"]),
        "ours": nlls_with(model, tokenizer, ours.deltas, record),
        "theirs": nlls_with(model, tokenizer, {name: theirs_dw.to(weight.dtype)}, record),
        "seconds_ours": ours_s,
        "seconds_theirs": theirs_s,
    }


def summarise(rows: list[dict]) -> dict:
    keys = ["cos_dW", "norm_ratio_dW", "rel_diff_dW", "cos_u", "cos_value_change", "norm_ratio_value_change"]
    out = {}
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = {"min": min(values), "max": max(values), "mean": sum(values) / len(values)}
    if rows and "ours" in rows[0]:
        for side in ("ours", "theirs"):
            out[f"nll_new_{side}_mean"] = sum(r[side]["nll_new"] for r in rows) / len(rows)
            out[f"efficacy_{side}"] = sum(r[side]["prefers_new"] for r in rows) / len(rows)
        out["nll_before_mean"] = sum(r["nll_before"] for r in rows) / len(rows)
    return out


# --- MEMIT --------------------------------------------------------------------------------------


def memit_pair(model, tokenizer, ee, hparams, records, covariances, log) -> dict:
    from flearning.editing import memit_edit
    from flearning.editing.values import ValueSettings

    values = ValueSettings(
        steps=hparams.v_num_grad_steps,
        lr=hparams.v_lr,
        weight_decay=hparams.v_weight_decay,
        clamp_norm_factor=hparams.clamp_norm_factor,
        kl_factor=hparams.kl_factor,
    )
    start = time.perf_counter()
    ours = memit_edit(
        model,
        tokenizer,
        records,
        hparams.layers,
        mom2_update_weight=hparams.mom2_update_weight,
        covariance=covariances,
        values=values,
    )
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    with quiet(log):
        deltas = ee["memit_main"].execute_memit(
            model, tokenizer, [as_easyedit_request(r) for r in records], hparams
        )
    theirs_s = time.perf_counter() - start
    their_losses = easyedit_losses(log[-1])
    theirs = {}
    for name, (adj_k, resid) in deltas.items():
        weight = model.get_parameter(name)
        upd = ee["memit_main"].upd_matrix_match_shape(adj_k @ resid.T, weight.shape)  # apply_memit_to_model's
        theirs[name] = upd.to(weight.dtype)
    layers = []
    for layer in hparams.layers:
        name = hparams.rewrite_module_tmp.format(layer) + ".weight"
        layers.append(
            {
                "layer": layer,
                "cos_dW": cosine(theirs[name], ours.deltas[name]),
                "norm_ratio_dW": norm_ratio(theirs[name], ours.deltas[name]),
                "rel_diff_dW": relative_difference(theirs[name], ours.deltas[name]),
                "norm_dW_ours": float(ours.deltas[name].double().norm()),
            }
        )
    flat_ours = torch.cat([ours.deltas[n].flatten() for n in sorted(ours.deltas)])
    flat_theirs = torch.cat([theirs[n].flatten() for n in sorted(ours.deltas)])
    per_record = []
    for record in records:
        per_record.append(
            {
                "case_id": record.get("case_id"),
                "nll_before": target_nll(model, tokenizer, record["prompt"], record["target_new"]),
                "ours": nlls_with(model, tokenizer, ours.deltas, record),
                "theirs": nlls_with(model, tokenizer, theirs, record),
            }
        )
    return {
        "requests": len(records),
        "layers": layers,
        "cos_dW_all_layers": cosine(flat_theirs, flat_ours),
        "norm_ratio_dW_all_layers": norm_ratio(flat_theirs, flat_ours),
        "rel_diff_dW_all_layers": relative_difference(flat_theirs, flat_ours),
        "loss_final_ours": [row[-1] for row in ours.values.losses],
        "evaluations_theirs": len(their_losses),
        "records": per_record,
        "seconds_ours": ours_s,
        "seconds_theirs": theirs_s,
    }


# --- driver -------------------------------------------------------------------------------------


def load_records(path: Path, start: int, n: int) -> list[dict]:
    data = json.loads(path.read_text())
    chosen = data[start : start + n]
    if len(chosen) < n:
        raise SystemExit(f"{path}: {len(data)} records, fewer than --start {start} + --n {n}")
    for i, record in enumerate(chosen):
        missing = [k for k in ("prompt", "subject", "target_new", "ground_truth") if not record.get(k)]
        if missing:
            raise SystemExit(f"{path}: record {start + i}: missing field(s) {', '.join(missing)}")
    return chosen


def relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        import os

        return os.path.relpath(Path(path).resolve(), REPO)


def print_rome(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    head = (
        f"{'case':>6} {'1-cos dW':>9} {'|dW| e/o':>9} {'1-cos u':>9} {'1-cos v-Wk':>10} {'|v-Wk| e/o':>10} "
        f"{'NLL before':>10} {'NLL ours':>9} {'NLL EE':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['case_id']!s:>6} {1 - r['cos_dW']:9.1e} {r['norm_ratio_dW']:9.6f} {1 - r['cos_u']:9.1e} "
            f"{1 - r['cos_value_change']:10.1e} {r['norm_ratio_value_change']:10.6f} {r['nll_before']:10.3f} "
            f"{r['ours']['nll_new']:9.3f} {r['theirs']['nll_new']:9.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--easyedit", type=Path, required=True, help="EasyEdit's source (checkout or extract)"
    )
    parser.add_argument(
        "--easyedit-commit", default=None, help="the commit of that source, if not a git checkout"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CounterFact records (JSON list)")
    parser.add_argument("--start", type=int, default=200, help="first record (validation records >= 200)")
    parser.add_argument("--n", type=int, default=5, help="records for ROME")
    parser.add_argument("--rome-layer", type=int, default=None, help="default: EasyEdit's LLaMA file (5)")
    parser.add_argument(
        "--memit-layers", type=int, nargs="+", default=None, help="default: EasyEdit's LLaMA file (4 5 6 7 8)"
    )
    parser.add_argument("--memit-n", type=int, default=3, help="requests of the MEMIT batch (0: no MEMIT)")
    parser.add_argument(
        "--sampled-templates", action="store_true", help="also EasyEdit's own sampled templates"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="easyedit-crosscheck.json")
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (EasyEdit's stats dir, its log)")
    args = parser.parse_args()

    from flearning.editing import CovarianceSettings, second_moments
    from flearning.editing.requests import CONTEXT_PREFIXES
    from flearning.models import load_model

    root = args.easyedit.resolve()
    ee = import_easyedit(root)
    work = args.work or Path(tempfile.mkdtemp(prefix="easyedit-crosscheck-"))
    work.mkdir(parents=True, exist_ok=True)
    stats_dir = work / "stats"
    torch.manual_seed(args.seed)

    model, tokenizer = load_model()
    records = load_records(args.data, args.start, args.n)
    n_layers = model.config.num_hidden_layers

    rome_base = ee["rome_hparams"].ROMEHyperParams.from_hparams(str(root / ROME_HPARAMS))
    memit_base = ee["memit_hparams"].MEMITHyperParams.from_hparams(str(root / MEMIT_HPARAMS))
    overrides = {
        "model_name": model.config._name_or_path,
        "device": "cpu",
        "stats_dir": str(stats_dir),
        "v_loss_layer": n_layers - 1,
        "mom2_dataset": STATS_DATASET,
        "mom2_dtype": "float32",
    }
    if getattr(model.config, "tie_word_embeddings", False):
        # a tied LM head is not among named_parameters, where nethook.get_parameter looks for MEMIT's
        # compute_z; its weight is the embedding's (EasyEdit's GPT-2 files name transformer.wte the same way)
        overrides["lm_head_module"] = "model.embed_tokens"
    if args.rome_layer is not None:
        rome_base = dataclasses.replace(rome_base, layers=[args.rome_layer])
    if args.memit_layers:
        memit_base = dataclasses.replace(memit_base, layers=sorted(args.memit_layers))
    rome_on = dataclasses.replace(rome_base, **overrides, mom2_adjustment=True)
    rome_off = dataclasses.replace(rome_base, **overrides, mom2_adjustment=False)
    memit_hp = dataclasses.replace(memit_base, **overrides)

    # our C, in EasyEdit's cache format too
    settings = CovarianceSettings()
    layers = sorted({*rome_on.layers, *(memit_hp.layers if args.memit_n else [])})
    modules = [rome_on.rewrite_module_tmp.format(layer) for layer in layers]
    start = time.perf_counter()
    moments = second_moments(model, tokenizer, modules, settings)
    cov_s = time.perf_counter() - start
    for module in modules:
        write_easyedit_stats(ee, model, stats_dir, module, moments[module], rome_on.mom2_n_samples)
    covariance = {layer: moments[m] for layer, m in zip(layers, modules, strict=True)}

    # our context templates, in EasyEdit's template caches
    ours_templates = ["{}"] + [prefix + "{}" for prefix in CONTEXT_PREFIXES]
    ee["rome_main"].CONTEXT_TEMPLATES_CACHE = list(ours_templates)
    ee["memit_main"].CONTEXT_TEMPLATES_CACHE = [["{}"], [prefix + "{}" for prefix in CONTEXT_PREFIXES]]

    log: list[str] = []
    results: dict = {}
    rome_layer = rome_on.layers[0]

    def save(complete: bool) -> None:
        """The results so far (written after each part, so a long run leaves what it measured)."""
        (work / "easyedit-stdout.log").write_text("\n".join(log))
        payload = {
            "what": "flearning.editing ROME/MEMIT against EasyEdit's execute_rome/execute_memit on the same "
            "records, layer, hyper-parameters, context templates and C (issue #12)",
            "command": "nice -n 5 .venv/bin/python benchmarks/easyedit_crosscheck.py "
            + " ".join(shlex.quote(a) for a in sys.argv[1:]).replace(str(root), "EASYEDIT_DIR"),
            "machine": machine(),
            "easyedit": {
                "repository": "https://github.com/zjunlp/EasyEdit",
                "commit": easyedit_commit(root, args.easyedit_commit),
                "hparams": {"rome": ROME_HPARAMS, "memit": MEMIT_HPARAMS},
                "overrides": {k: v for k, v in overrides.items() if k not in ("model_name", "stats_dir")},
            },
            "model": "smollm2-135m",
            "data": relative(args.data),
            "records": f"[{args.start}, {args.start + args.n})",
            "controlled": {
                "context_templates": ours_templates,
                "covariance": "ours, written into EasyEdit's layer_stats cache (npz)",
                "value_settings": {
                    "steps": rome_on.v_num_grad_steps,
                    "lr": rome_on.v_lr,
                    "weight_decay": rome_on.v_weight_decay,
                    "clamp_norm_factor": rome_on.clamp_norm_factor,
                    "kl_factor": rome_on.kl_factor,
                },
                "rome_layer": rome_layer,
                "memit_layers": memit_hp.layers if args.memit_n else None,
                "mom2_update_weight": memit_hp.mom2_update_weight,
            },
            **results,
        }
        payload["complete"] = complete
        write_json(args.out, payload)

    for key, hp, cov in (
        ("rome_mom2_on", rome_on, covariance[rome_layer]),
        ("rome_mom2_off", rome_off, None),
    ):
        rows = [rome_pair(model, tokenizer, ee, hp, r, cov, log) for r in records]
        results[key] = {"summary": summarise(rows), "records": rows}
        print_rome(f"ROME layer {rome_layer}, mom2_adjustment {hp.mom2_adjustment} (EasyEdit / ours)", rows)
        save(complete=False)

    # EasyEdit really inverted our C
    inv = ee["compute_u"].inv_mom2_cache[
        (model.config._name_or_path.replace("/", "_"), rome_on.rewrite_module_tmp.format(rome_layer))
    ]
    identity_error = float(
        (inv.double() @ covariance[rome_layer].double() - torch.eye(inv.shape[0], dtype=torch.float64))
        .abs()
        .max()
    )
    c64 = covariance[rome_layer].double()
    eig = torch.linalg.eigvalsh(c64)
    results["covariance"] = {
        "corpus": str(settings.corpus),
        "max_tokens": settings.max_tokens,
        "max_length": settings.max_length,
        "seconds": cov_s,
        "layers": layers,
        "easyedit_inverse_times_ours_max_abs_error_from_identity": identity_error,
        "condition_number_layer": float(eig[-1] / eig[0]),
    }

    if args.memit_n:
        memit_records = records[: args.memit_n]
        memit_cov = {layer: covariance[layer] for layer in memit_hp.layers}
        results["memit"] = memit_pair(model, tokenizer, ee, memit_hp, memit_records, memit_cov, log)
        save(complete=False)
        m = results["memit"]
        print(f"\nMEMIT layers {memit_hp.layers}, {m['requests']} requests (EasyEdit / ours)")
        for row in m["layers"]:
            print(
                f"  layer {row['layer']}: 1-cos dW {1 - row['cos_dW']:.1e}  |dW| ratio {row['norm_ratio_dW']:.6f}  "
                f"rel diff {row['rel_diff_dW']:.2e}"
            )
        print(
            f"  all layers: 1-cos {1 - m['cos_dW_all_layers']:.1e}  |dW| ratio {m['norm_ratio_dW_all_layers']:.6f}"
        )
        for r in m["records"]:
            print(
                f"  case {r['case_id']}: NLL before {r['nll_before']:.3f}  ours {r['ours']['nll_new']:.3f}  "
                f"EasyEdit {r['theirs']['nll_new']:.3f}"
            )

    if args.sampled_templates:
        ee["rome_main"].CONTEXT_TEMPLATES_CACHE = None
        torch.manual_seed(args.seed)
        try:
            rows = [rome_pair(model, tokenizer, ee, rome_on, r, covariance[rome_layer], log) for r in records]
        except Exception as ex:  # EasyEdit's generate_fast against this transformers: report, go on
            results["rome_mom2_on_easyedit_sampled_templates"] = {"error": f"{type(ex).__name__}: {ex}"}
            print(f"\nEasyEdit's sampled templates failed: {type(ex).__name__}: {ex}")
        else:
            results["rome_mom2_on_easyedit_sampled_templates"] = {
                "templates": ee["rome_main"].CONTEXT_TEMPLATES_CACHE,
                "summary": summarise(rows),
                "records": rows,
            }
            print_rome("ROME with EasyEdit's sampled templates (ours: fixed prefixes), mom2 on", rows)
        ee["rome_main"].CONTEXT_TEMPLATES_CACHE = list(ours_templates)

    save(complete=True)
    print(f"\nwrote {relative(RESULTS / args.out)}")


if __name__ == "__main__":
    main()
