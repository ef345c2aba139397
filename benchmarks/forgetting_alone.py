"""Forgetting alone: what θ' = θ − λ·Δ_old does before any learning (issue #11, item 5; the F-Learning
paper's Figures 6 and 7).

For each dataset and seed, θ is primed as ``flearn bench`` primes it (``recipes.bench.Bench.primed``: the
same records, settings and cache key as the profile's bench), Δ_old is computed once per forget-stage kind
(full FT and LoRA, the profile's ``forget_full`` / ``forget_lora`` settings, ``recipes.algorithm.
forget_stage``, cached as the bench caches it), and every λ is applied to a copy of θ by arithmetic
(``vectors.forget``; θ's weights are put back before each λ, so each θ' is θ − λ·Δ_old exactly, which the
vector's base-fingerprint check confirms) and evaluated with no learning (``evaluation.evaluate``, no
generation): Old retention (teacher-forced accuracy of target_old on the edit prompts), Reliability and
Generality (of target_new), Locality (neighbourhood argmax against θ), Efficacy (new answer's NLL below
the old's) and perplexity on the first ``--passages`` passages of the bench's held-out text. λ = 0 is θ
itself, evaluated once for both kinds; θ₀ (the model before priming, where a subtraction heads back to) is
evaluated beside it, its Locality against θ too. With several seeds the summary is the mean and the
sample standard deviation over seeds (the seed is the unit; only seeds with every row). The JSON is
rewritten after every row; rows already in it with the same settings are kept (``--fresh`` measures
everything again), so a second seed adds to the first.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/forgetting_alone.py --profile paper --seeds 0
        [--n 200] [--lambdas 0.1,0.3,0.5,0.7,0.9,1.5,3] [--passages 50] [--work /tmp/forgetting-alone]
    .venv/bin/python benchmarks/forgetting_alone.py --plot-only   # the plot and summary from the JSON's rows
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, RESULTS, machine, repo_path, write_json  # noqa: E402

OUT = "forgetting-alone.json"
PNG = REPO / "docs" / "forgetting-alone.png"
LAMBDAS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.5, 3.0)
# the F-Learning method whose forget stage gives each kind of Δ_old (its settings: forget_full, forget_lora)
KINDS = {"full": "flearning-ft", "lora": "flearning-lora"}
METRICS = ("old_retention", "reliability", "generality", "locality", "efficacy", "paraphrase")
LABELS = {
    "old_retention": "Old",
    "reliability": "Rel.",
    "generality": "Gen.",
    "locality": "Loc.",
    "efficacy": "Eff.",
    "paraphrase": "Para.",
    "perplexity": "PPL",
}


def bench_config(args: argparse.Namespace):
    """The profile's bench configuration, with this script's scale, seeds and perplexity passages. Only the
    forgetting methods are named: the priming does not depend on the methods, and the editors' checks
    (their subjects, C's corpus) have nothing to do here."""
    from flearning.config import BenchConfig
    from flearning.config.loading import load_config

    cli = {
        "seeds": args.seeds,
        "methods": list(KINDS.values()),
        "out": str(args.work / args.profile),
        "perplexity": {"passages": args.passages},
    }
    if args.n is not None:
        cli["n"] = args.n
    return load_config(BenchConfig, None, [], cli, profile=args.profile)


def settings_of(cfg, args: argparse.Namespace) -> dict:
    """What a row's values depend on besides (dataset, seed, kind, λ): rows are kept only under these."""
    from flearning.methods import METHODS

    forget = {}
    for kind, method in KINDS.items():
        stage = cfg.stage_plan(METHODS[method], 0).forget
        forget[kind] = {k: v for k, v in stage.model_dump(mode="json").items() if k != "seed"}
    return {
        "profile": args.profile,
        "n": cfg.n,
        "template": cfg.template,
        "zsre_old": cfg.zsre_old,
        "prime": cfg.prime.model_dump(mode="json"),
        "forget": forget,
        "perplexity": cfg.perplexity.model_dump(mode="json"),
        "eval_batch_size": cfg.eval_batch_size,
        "generation": False,
    }


def unchanged_row(bench, model, split, dataset: str, seed: int, forget: str | None) -> dict:
    """The row of a model evaluated as it is (θ: ``forget`` None; θ₀: "base"), at λ 0."""
    metrics, ppl, seconds = evaluate_row(bench, model, split, bench.held_out)
    return {
        "dataset": dataset,
        "seed": seed,
        "forget": forget,
        "lambda": 0.0,
        "metrics": metrics,
        "perplexity": ppl,
        "seconds": {"apply": 0.0, "evaluate": round(seconds, 1)},
    }


def evaluate_row(bench, model, split, corpus) -> tuple[dict, dict, float]:
    """Every metric of ``model`` on the split's records, Locality against θ; perplexity on ``corpus``."""
    from flearning.evaluation.evaluate import evaluate

    start = time.perf_counter()
    result = evaluate(
        model,
        bench.tokenizer,
        split.records,
        reference=split.reference,
        batch_size=bench.cfg.eval_batch_size,
        generation=False,
        perplexity=corpus,
        progress=False,
        seed=split.theta.seed,
        template=bench.cfg.template,
    )
    seconds = time.perf_counter() - start
    summary = result.summary()
    metrics = {m: summary[m]["mean"] for m in METRICS}
    ppl = {k: result.perplexity[k] for k in ("perplexity", "nll", "tokens", "passages", "seconds")}
    return metrics, ppl, seconds


def restore(model, theta_params: dict) -> None:
    """Put θ's weights back into ``model`` (a copy of θ)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(theta_params[name])


def format_row(row: dict) -> str:
    kind = {None: "θ", "base": "θ₀"}.get(row["forget"], row["forget"])
    cells = " ".join(f"{row['metrics'][m]:>6.1f}" for m in METRICS)
    return (
        f"{row['dataset']:<12} {row['seed']:>4} {kind:<5} {row['lambda']:>5g} {cells} "
        f"{row['perplexity']['perplexity']:>8.2f} {row['seconds']['evaluate']:>7.1f}"
    )


def header() -> str:
    cells = " ".join(f"{LABELS[m]:>6}" for m in METRICS)
    return f"{'dataset':<12} {'seed':>4} {'Δold':<5} {'λ':>5} {cells} {'PPL':>8} {'eval s':>7}"


def run(args: argparse.Namespace) -> dict:
    from flearning.methods import METHODS
    from flearning.recipes.algorithm import forget_stage
    from flearning.recipes.bench import Bench
    from flearning.recipes.bench_cache import forget_key
    from flearning.vectors import forget

    cfg = bench_config(args)
    settings = settings_of(cfg, args)
    path = RESULTS / args.out
    kept: dict[tuple, dict] = {}
    previous = json.loads(path.read_text()) if path.is_file() and not args.fresh else None
    if previous is not None and previous.get("settings") == settings:
        kept = {(r["dataset"], r["seed"], r["forget"], r["lambda"]): r for r in previous["rows"]}
    payload = {
        "command": ("benchmarks/forgetting_alone.py " + " ".join(sys.argv[1:])).strip(),
        "machine": machine(),
        "model": cfg.model,
        "data": {name: os.path.relpath(p, REPO) for name, p in cfg.data.items()},  # as the bench records it
        "records": f"the first {cfg.n} records of each dataset (the bench's evaluated records)",
        "lambdas": [0.0, *args.lambdas],
        "settings": settings,
        "perplexity_corpus": f"{cfg.perplexity.corpus}, first {cfg.perplexity.passages} passages, "
        f"each cut to {cfg.perplexity.max_tokens} tokens",
        # how θ and each Δ_old were obtained, from the invocation that trained them (kept with its rows)
        "primes": list(previous["primes"]) if kept else [],
        "forget_stages": list(previous["forget_stages"]) if kept else [],
        "invocations": list(previous.get("invocations", [])) if kept else [],
        "rows": [r for r in kept.values() if r["seed"] not in cfg.seeds],
    }
    invocation = {"command": payload["command"], "seeds": cfg.seeds}
    payload["invocations"].append(invocation)
    started = time.perf_counter()
    print(header(), flush=True)
    bench = Bench(cfg, progress=False)
    start = time.perf_counter()
    bench.setup()
    payload["setup_seconds"] = round(time.perf_counter() - start, 1)
    for seed in cfg.seeds:  # a seed at a time: a run stopped early leaves whole seeds behind
        for dataset, (evaluated, validation) in bench.datasets.items():
            start = time.perf_counter()
            primed_before = bench.counters["trained_prime"]
            theta = bench.primed(dataset, seed, [*evaluated, *validation])
            prime_seconds = time.perf_counter() - start
            start = time.perf_counter()
            split = bench.split(theta, "eval", evaluated)
            reference_seconds = time.perf_counter() - start
            note(
                payload["primes"],
                bench.counters["trained_prime"] > primed_before,
                {
                    "dataset": dataset,
                    "seed": seed,
                    "key": theta.key,
                    "trained_now": bench.counters["trained_prime"] > primed_before,
                    "seconds": round(prime_seconds, 1),
                    "training_seconds": round(theta.info["seconds"], 1),
                    "epochs": theta.info["epochs"],
                    "old_accuracy_before": theta.info["accuracy_before"],
                    "old_accuracy": theta.info["accuracy"],
                    "reference_seconds": round(reference_seconds, 1),
                },
            )
            theta_params = {n: p.detach().clone() for n, p in theta.model.named_parameters()}
            work = copy.deepcopy(theta.model)
            old_pairs = [r.old_pair for r in evaluated]
            row_key = (dataset, seed, None, 0.0)
            row = kept.get(row_key)
            if row is None:
                row = unchanged_row(bench, work, split, dataset, seed, None)
            payload["rows"].append(row)
            print(format_row(row), flush=True)
            write_json(args.out, payload)
            row = kept.get((dataset, seed, "base", 0.0))
            if row is None:  # θ₀, the model before priming: where a subtraction heads back to
                row = unchanged_row(bench, bench.base, split, dataset, seed, "base")
            payload["rows"].append(row)
            print(format_row(row), flush=True)
            write_json(args.out, payload)
            for kind, method in KINDS.items():
                plan = cfg.stage_plan(METHODS[method], seed)
                todo = [lam for lam in args.lambdas if (dataset, seed, kind, lam) not in kept]
                vector = None
                if todo:
                    stage = forget_stage(
                        work,  # θ's copy: full FT puts its weights back, LoRA never changes them
                        bench.tokenizer,
                        old_pairs,
                        plan.forget,
                        cache=bench.cache.vector_dir(forget_key(theta.key, "eval", plan.forget)),
                        progress=False,
                        metadata={"method": f"forget-{kind}"},
                    )
                    vector = stage.vector
                    stats = vector.stats()
                    note(
                        payload["forget_stages"],
                        True,
                        {
                            "dataset": dataset,
                            "seed": seed,
                            "forget": kind,
                            "trained_now": stage.trained,
                            "seconds": round(stage.seconds, 1),
                            "steps": stage.steps,
                            "tensors": stats.num_tensors,
                            "params": stats.num_params,
                            "norm": stats.norm,
                            "max_abs": stats.max_abs,
                            "base_fingerprint_checked": bool(vector.metadata.base_fingerprint),
                        },
                    )
                for lam in args.lambdas:
                    row = kept.get((dataset, seed, kind, lam))
                    if row is None:
                        start = time.perf_counter()
                        restore(work, theta_params)
                        forget(work, vector, lam)  # θ' = θ − λ·Δ_old (refused unless work is θ)
                        apply_seconds = time.perf_counter() - start
                        metrics, ppl, seconds = evaluate_row(bench, work, split, bench.held_out)
                        row = {
                            "dataset": dataset,
                            "seed": seed,
                            "forget": kind,
                            "lambda": lam,
                            "metrics": metrics,
                            "perplexity": ppl,
                            "seconds": {"apply": round(apply_seconds, 2), "evaluate": round(seconds, 1)},
                        }
                    payload["rows"].append(row)
                    print(format_row(row), flush=True)
                    write_json(args.out, payload)
                restore(work, theta_params)
            del theta, split, work, theta_params
    invocation["wall_seconds"] = round(time.perf_counter() - started, 1)
    payload["summary_seeds"] = complete_seeds(payload["rows"])
    payload["summary"] = summarize(payload["rows"])
    write_json(args.out, payload)
    return payload


def note(entries: list[dict], measured_now: bool, entry: dict) -> None:
    """Record how θ or a Δ_old was obtained: an entry for the same (dataset, seed, kind) is replaced when
    it was trained now, kept when this invocation only read it back from the cache."""
    same = [
        i
        for i, e in enumerate(entries)
        if (e["dataset"], e["seed"], e.get("forget"))
        == (entry["dataset"], entry["seed"], entry.get("forget"))
    ]
    if same and not measured_now:
        return
    for i in reversed(same):
        del entries[i]
    entries.append(entry)


def complete_seeds(rows: list[dict]) -> dict[str, list[int]]:
    """Per dataset, the seeds whose every row is there (θ, θ₀ and each λ of both kinds): a killed run's
    last seed is left out of the summary rather than averaged over fewer λ than the others."""
    lambdas = {r["lambda"] for r in rows if r["forget"] in KINDS}
    wanted = {(None, 0.0), ("base", 0.0), *((kind, lam) for kind in KINDS for lam in lambdas)}
    have: dict[tuple[str, int], set] = {}
    for r in rows:
        have.setdefault((r["dataset"], r["seed"]), set()).add((r["forget"], r["lambda"]))
    out: dict[str, list[int]] = {}
    for (dataset, seed), found in have.items():
        if found >= wanted:
            out.setdefault(dataset, []).append(seed)
    return {dataset: sorted(seeds) for dataset, seeds in out.items()}


def summarize(rows: list[dict]) -> list[dict]:
    """Per (dataset, kind, λ): the mean over the complete seeds (``complete_seeds``) of each metric and
    perplexity, and their sample standard deviation over seeds (the seed is the unit; None with one
    seed). θ (λ = 0) is listed under both kinds."""
    complete = complete_seeds(rows)
    rows = [r for r in rows if r["seed"] in complete.get(r["dataset"], [])]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        kinds = list(KINDS) if row["forget"] is None else [row["forget"]]  # θ is λ = 0 of both kinds
        for kind in kinds:
            groups.setdefault((row["dataset"], kind, row["lambda"]), []).append(row)
    order = list(dict.fromkeys(row["dataset"] for row in rows))  # the bench's order of datasets
    out = []
    for (dataset, kind, lam), members in sorted(
        groups.items(), key=lambda kv: (order.index(kv[0][0]), *kv[0][1:])
    ):
        values = {m: [r["metrics"][m] for r in members if r["metrics"][m] is not None] for m in METRICS}
        values["perplexity"] = [r["perplexity"]["perplexity"] for r in members]
        entry = {
            "dataset": dataset,
            "forget": kind,
            "lambda": lam,
            "seeds": sorted(r["seed"] for r in members),
        }
        for name, vals in values.items():
            mean = math.fsum(vals) / len(vals) if vals else None
            sd = (
                math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                if len(vals) > 1
                else None
            )
            entry[name] = {"mean": mean, "sd": sd}
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    """The seed-averaged rows as a Markdown table per dataset (mean ± sd over seeds when several); θ₀,
    the model before priming, first."""
    names = [*METRICS, "perplexity"]
    lines = []
    for dataset in dict.fromkeys(e["dataset"] for e in summary):
        lines += [
            f"**{dataset}**",
            "",
            "| Δ_old | λ | " + " | ".join(LABELS[m] for m in names) + " |",
            "|---|---:|" + "---:|" * len(names),
        ]
        for e in (e for e in summary if e["dataset"] == dataset):
            cells = []
            for m in names:
                mean, sd = e[m]["mean"], e[m]["sd"]
                digits = 2 if m == "perplexity" else 1
                cell = "–" if mean is None else f"{mean:.{digits}f}"
                cells.append(cell + (f" ± {sd:.{digits}f}" if sd is not None else ""))
            what, lam = (
                ("θ₀ (before priming)", "–") if e["forget"] == "base" else (e["forget"], f"{e['lambda']:g}")
            )
            lines.append(f"| {what} | {lam} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(payload: dict, png: Path) -> None:
    """Per dataset: Old retention, Reliability and Locality against λ (left) and perplexity (right), full-FT
    Δ_old solid and LoRA Δ_old dashed; the mean over seeds, with their spread as error bars."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = payload["summary"]
    datasets = list(dict.fromkeys(e["dataset"] for e in summary))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(12, 4.2 * len(datasets)), squeeze=False)
    colours = {"old_retention": "tab:red", "reliability": "tab:blue", "locality": "tab:green"}
    styles = {"full": ("-", "o"), "lora": ("--", "s")}
    seeds = sorted({s for e in summary for s in e["seeds"]})
    for row_axes, dataset in zip(axes, datasets, strict=True):
        left, right = row_axes
        for kind, (line, marker) in styles.items():
            entries = sorted(
                (e for e in summary if e["dataset"] == dataset and e["forget"] == kind),
                key=lambda e: e["lambda"],
            )
            lams = [e["lambda"] for e in entries]
            for metric, colour in colours.items():
                left.errorbar(
                    lams,
                    [e[metric]["mean"] for e in entries],
                    yerr=[e[metric]["sd"] or 0.0 for e in entries],
                    color=colour,
                    linestyle=line,
                    marker=marker,
                    markersize=4,
                    capsize=2,
                    label=f"{LABELS[metric].rstrip('.')} ({kind} Δ_old)",
                )
            right.errorbar(
                lams,
                [e["perplexity"]["mean"] for e in entries],
                yerr=[e["perplexity"]["sd"] or 0.0 for e in entries],
                color="black",
                linestyle=line,
                marker=marker,
                markersize=4,
                capsize=2,
                label=f"{kind} Δ_old",
            )
        base = next((e for e in summary if e["dataset"] == dataset and e["forget"] == "base"), None)
        if base is not None:  # θ₀, the model before priming
            left.axhline(base["old_retention"]["mean"], color="tab:red", linestyle=":", linewidth=1)
            left.axhline(base["reliability"]["mean"], color="tab:blue", linestyle=":", linewidth=1)
            right.axhline(
                base["perplexity"]["mean"],
                color="grey",
                linestyle=":",
                linewidth=1,
                label="θ₀ (before priming)",
            )
            left.plot([], [], color="grey", linestyle=":", label="θ₀ (before priming): Old, Rel")
        ticks = sorted({e["lambda"] for e in summary if e["dataset"] == dataset and e["forget"] != "base"})
        for ax in (left, right):
            ax.set_xticks(ticks, [f"{lam:g}" for lam in ticks], fontsize=8)
        left.set_title(f"{dataset}: accuracy of θ − λ·Δ_old, no learning")
        left.set_xlabel("λ (0: θ itself)")
        left.set_ylabel("% (Old = old-fact accuracy, Rel. = new-fact, Loc. vs θ)")
        left.set_ylim(-2, 102)
        left.grid(alpha=0.3)
        left.legend(fontsize=7, ncol=2)
        right.set_title(f"{dataset}: perplexity on held-out text")
        right.set_xlabel("λ")
        right.set_ylabel("perplexity (log scale)")
        right.set_yscale("log")
        right.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        right.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        right.tick_params(axis="y", which="minor", labelsize=7)
        right.grid(alpha=0.3, which="both")
        right.legend(fontsize=8)
    fig.suptitle(
        f"Forgetting alone on SmolLM2-135M ({payload['settings']['profile']} profile, "
        f"{payload['settings']['n']} facts, {'seed' if len(seeds) == 1 else 'mean ± sd over seeds'} "
        f"{', '.join(map(str, seeds))}; full-FT Δ_old solid, LoRA Δ_old dashed)",
        fontsize=11,
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"wrote {repo_path(png)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("paper", "paper-v2"), default="paper", help="stage settings")
    parser.add_argument("--n", type=int, default=None, help="facts per dataset (default: the profile's)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument(
        "--lambdas", default=",".join(f"{x:g}" for x in LAMBDAS), help="λ > 0, comma-separated"
    )
    parser.add_argument("--passages", type=int, default=50, help="held-out passages for perplexity")
    parser.add_argument("--work", type=Path, default=Path("/tmp/forgetting-alone"), help="θ and Δ_old cache")
    parser.add_argument("--out", default=OUT, help="file name under benchmarks/results/")
    parser.add_argument("--png", type=Path, default=PNG, help="the plot")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument(
        "--plot-only", action="store_true", help="only redraw the plot and the JSON's summary from its rows"
    )
    parser.add_argument("--fresh", action="store_true", help="measure every row again")
    args = parser.parse_args()
    if args.plot_only:
        payload = json.loads((RESULTS / args.out).read_text())
        # the summary of the complete seeds, also of a run stopped before its end, written back
        payload["summary_seeds"] = complete_seeds(payload["rows"])
        payload["summary"] = summarize(payload["rows"])
        write_json(args.out, payload)
    else:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        args.lambdas = [float(s) for s in args.lambdas.split(",") if s.strip()]
        if not args.lambdas or any(lam <= 0 for lam in args.lambdas):
            parser.error("--lambdas: give λ > 0 (λ = 0, θ itself, is always measured)")
        payload = run(args)
    print(markdown(payload["summary"]))
    if not args.no_plot:
        plot(payload, args.png)


if __name__ == "__main__":
    main()
