"""One-record-at-a-time evaluation, the way EasyEdit evaluates: one unpadded forward per record per
metric, full logits. Slow and obviously correct; the batched ``evaluate`` is tested and benchmarked
against it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from flearning.evaluation.definitions import (
    DEFAULT_FLUENCY_SEED,
    DEFAULT_FLUENCY_TOKENS,
    EXACT_MATCH_EXTRA_TOKENS,
    FLUENCY_SAMPLED_LENGTH,
    FLUENCY_SAMPLED_TOP_K,
)
from flearning.evaluation.metrics import (
    argmax_agreement,
    category_means,
    mean_or_none,
    mean_target_nll,
    nll_prefers_new,
    target_argmax,
    token_accuracy,
)
from flearning.evaluation.probes import eos_token_id, pad_token_id, probe_categories, record_probes
from flearning.evaluation.results import EvalResult
from flearning.evaluation.sampling import rome_text, sample_generate
from flearning.evaluation.scoring import Probe, ProbeScore, greedy_generate
from flearning.evaluation.text import compute_n_gram_entropy, exact_match

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from flearning.data.records import KnowledgeRecord


class _Counter:
    def __init__(self) -> None:
        self.forwards = 0
        self.generations = 0
        self.generation_seconds = 0.0


def single_score(model: PreTrainedModel, probe: Probe, counter: _Counter | None = None) -> ProbeScore:
    """Score one probe with its own unpadded forward pass (no attention mask, full logits).

    Args:
        model: a causal LM in eval mode.
        probe: prompt and target tokens.
        counter: counts forward passes (benchmark bookkeeping).
    Returns:
        The probe's ``ProbeScore``.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([[*probe.prompt_ids, *probe.target_ids]], device=device)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(probe.prompt_ids) :] = True
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    if counter is not None:
        counter.forwards += 1
    return ProbeScore(
        accuracy=float(token_accuracy(logits, ids, mask)[0]),
        nll=float(mean_target_nll(logits, ids, mask)[0]),
        argmax=tuple(target_argmax(logits, mask)[0]),
    )


def evaluate_oracle(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[KnowledgeRecord],
    *,
    reference_model: PreTrainedModel | None = None,
    generation: bool = True,
    fluency: bool = False,
    fluency_tokens: int = DEFAULT_FLUENCY_TOKENS,
    fluency_sampled: bool = False,
    fluency_seed: int = DEFAULT_FLUENCY_SEED,
    paraphrase: bool = True,
    progress: bool = False,
) -> EvalResult:
    """Every metric, one record and one metric at a time (EasyEdit style).

    Each metric runs its own forward passes: Reliability 1, Generality 1 per rephrase, Locality 1 on
    the reference and 1 on the model per locality pair, Portability 1 per pair, Old retention 1,
    Efficacy 2 (target_new, target_old), Paraphrase score 2 per rephrase; generation metrics one
    unpadded ``generate`` call each.

    Args:
        model: the evaluated model.
        tokenizer: its tokenizer.
        records: the facts.
        reference_model: the model before the update (None: Locality is None).
        generation: compute Generation exact match.
        fluency: compute Fluency.
        fluency_tokens: new tokens generated for Fluency.
        fluency_sampled: compute the sampled Fluency (one prompt per sampling call).
        fluency_seed: its seed.
        paraphrase: compute the Paraphrase score (EasyEdit has no such metric; the benchmark skips it).
        progress: show a progress bar.
    Returns:
        ``EvalResult`` whose ``meta`` counts forward passes and generate calls.
    """
    from flearning.io.progress import progress_bar

    counter = _Counter()
    pad_id, eos_id = pad_token_id(tokenizer), eos_token_id(tokenizer)
    models = [model] + ([reference_model] if reference_model is not None else [])
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        for record in progress_bar(
            records, desc="one at a time", unit="record", enabled=progress, leave=False
        ):
            probes = record_probes(tokenizer, record)

            def score(p: Probe, m: PreTrainedModel = model) -> ProbeScore:
                return single_score(m, p, counter)

            locality, locality_by = None, {}
            if reference_model is not None:
                locality, locality_by = category_means(
                    [
                        argmax_agreement(score(p, reference_model).argmax, score(p).argmax)
                        for p in probes.locality
                    ],
                    probe_categories(probes.locality, probes.locality_categories),
                )
            portability, portability_by = category_means(
                [score(p).accuracy for p in probes.portability],
                probe_categories(probes.portability, probes.portability_categories),
            )
            row: dict[str, Any] = {
                "id": record.id,
                "reliability": score(probes.new).accuracy,
                "generality": mean_or_none([score(p).accuracy for p in probes.rephrase_new]),
                "locality": locality,
                "portability": portability,
                "old_retention": score(probes.old).accuracy,
                "efficacy": nll_prefers_new(score(probes.new).nll, score(probes.old).nll),
                "paraphrase": (
                    mean_or_none(
                        [
                            nll_prefers_new(score(n).nll, score(o).nll)
                            for n, o in zip(probes.rephrase_new, probes.rephrase_old, strict=True)
                        ]
                    )
                    if paraphrase
                    else None
                ),
                "gen_exact_match": None,
                "fluency": None,
                "fluency_sampled": None,
            }
            if locality_by:
                row["locality_by_category"] = locality_by
            if portability_by:
                row["portability_by_category"] = portability_by
            prompt = list(probes.new.prompt_ids)
            gen_start = time.perf_counter()
            if generation:
                budget = len(probes.new.target_ids) + EXACT_MATCH_EXTRA_TOKENS
                ids = greedy_generate(model, [prompt], [budget], pad_id=pad_id, eos_id=eos_id, batch_size=1)[
                    0
                ]
                counter.generations += 1
                row["generated"] = tokenizer.decode(ids, skip_special_tokens=True)
                row["gen_exact_match"] = exact_match(row["generated"], record.target_new)
            if fluency:
                ids = greedy_generate(
                    model, [prompt], [fluency_tokens], pad_id=pad_id, eos_id=eos_id, batch_size=1
                )[0]
                counter.generations += 1
                row["fluency_text"] = tokenizer.decode([*prompt, *ids], skip_special_tokens=True)
                row["fluency"] = compute_n_gram_entropy(row["fluency_text"])
            if fluency_sampled:
                budget = max(0, FLUENCY_SAMPLED_LENGTH - len(prompt))
                ids = sample_generate(
                    model,
                    [prompt],
                    [budget],
                    pad_id=pad_id,
                    seed=fluency_seed,
                    top_k=FLUENCY_SAMPLED_TOP_K,
                    batch_size=1,
                )[0]
                counter.generations += 1
                row["fluency_sampled_text"] = rome_text(
                    tokenizer.decode([*prompt, *ids], skip_special_tokens=True)
                )
                row["fluency_sampled"] = compute_n_gram_entropy(row["fluency_sampled_text"])
            counter.generation_seconds += time.perf_counter() - gen_start
            rows.append(row)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    meta = {
        "mode": "sequential",
        "forward_calls": counter.forwards,
        "generate_calls": counter.generations,
        "records": len(rows),
        "seconds": {
            "total": round(time.perf_counter() - start, 3),
            "generation": round(counter.generation_seconds, 3),
        },
    }
    return EvalResult(records=rows, meta=meta)
