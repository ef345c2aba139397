"""``evaluate``: every metric of ``docs/DESIGN.md`` ("Metrics") for a model on knowledge records.

One batched teacher-forced pass over the distinct (prompt, target) probes, then batched greedy decoding
for the generation metrics. Batching never changes a value: ``oracle.evaluate_oracle`` is the
one-record-at-a-time implementation it is tested against.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.data.templates import PLAIN
from flearning.errors import FlearnError
from flearning.evaluation.definitions import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_FLUENCY_SEED,
    DEFAULT_FLUENCY_TOKENS,
    EXACT_MATCH_EXTRA_TOKENS,
    FLUENCY_SAMPLED_LENGTH,
    FLUENCY_SAMPLED_TOP_K,
)
from flearning.evaluation.metrics import argmax_agreement, category_means, mean_or_none, nll_prefers_new
from flearning.evaluation.probes import (
    RecordProbes,
    encode_probe,
    eos_token_id,
    pad_token_id,
    probe_categories,
    record_probes,
    unique_probes,
)
from flearning.evaluation.reference import ReferencePredictions, reference_predictions, require_prediction
from flearning.evaluation.results import EvalResult
from flearning.evaluation.sampling import rome_text, sample_generate
from flearning.evaluation.scoring import Probe, ProbeScore, greedy_generate, score_probes
from flearning.evaluation.text import compute_n_gram_entropy, exact_match

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from flearning.data.records import KnowledgeRecord
    from flearning.evaluation.corpus import PerplexityCorpus


def record_metrics(
    record: KnowledgeRecord,
    probes: RecordProbes,
    score: dict[Probe, ProbeScore],
    reference: ReferencePredictions | None,
    generated: str | None,
    fluency_text: str | None,
    sampled_text: str | None = None,
) -> dict[str, Any]:
    """Every metric of one record from its probe scores (pure: no model involved).

    Args:
        record: the fact.
        probes: its probes.
        score: the evaluated model's score of every probe.
        reference: reference argmaxes for Locality (None: Locality is None).
        generated: decoded greedy continuation for exact match (None: not computed).
        fluency_text: prompt + long greedy continuation for Fluency (None: not computed).
        sampled_text: prompt + top-k sampled continuation for the sampled Fluency (None: not computed).
    Returns:
        ``{"id", metrics..., "generated"?}``; missing metrics are None. Locality and Portability are the
        mean over the record's categories of the mean within each (``metrics.category_means``); when its
        probes have categories, ``locality_by_category`` / ``portability_by_category`` hold those means.
    """
    new, old = score[probes.new], score[probes.old]
    locality, locality_by = None, {}
    if reference is not None:
        locality, locality_by = category_means(
            [argmax_agreement(require_prediction(reference, p), score[p].argmax) for p in probes.locality],
            probe_categories(probes.locality, probes.locality_categories),
        )
    portability, portability_by = category_means(
        [score[p].accuracy for p in probes.portability],
        probe_categories(probes.portability, probes.portability_categories),
    )
    row: dict[str, Any] = {
        "id": record.id,
        "reliability": new.accuracy,
        "generality": mean_or_none([score[p].accuracy for p in probes.rephrase_new]),
        "locality": locality,
        "portability": portability,
        "old_retention": old.accuracy,
        "efficacy": nll_prefers_new(new.nll, old.nll),
        "paraphrase": mean_or_none(
            [
                nll_prefers_new(score[n].nll, score[o].nll)
                for n, o in zip(probes.rephrase_new, probes.rephrase_old, strict=True)
            ]
        ),
        "gen_exact_match": exact_match(generated, record.target_new) if generated is not None else None,
        "fluency": compute_n_gram_entropy(fluency_text) if fluency_text is not None else None,
        "fluency_sampled": compute_n_gram_entropy(sampled_text) if sampled_text is not None else None,
    }
    if locality_by:
        row["locality_by_category"] = locality_by
    if portability_by:
        row["portability_by_category"] = portability_by
    if generated is not None:
        row["generated"] = generated
    if fluency_text is not None:
        row["fluency_text"] = fluency_text
    if sampled_text is not None:
        row["fluency_sampled_text"] = sampled_text
    return row


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[KnowledgeRecord],
    *,
    reference: PreTrainedModel | ReferencePredictions | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    generation_batch_size: int | None = None,
    generation: bool = True,
    fluency: bool = False,
    fluency_tokens: int = DEFAULT_FLUENCY_TOKENS,
    fluency_sampled: bool = False,
    fluency_seed: int = DEFAULT_FLUENCY_SEED,
    perplexity: PerplexityCorpus | None = None,
    pack: bool = True,
    cache_dir: Path | str | None = None,
    progress: bool = True,
    seed: int | None = None,
    template: str = PLAIN,
) -> EvalResult:
    """Score ``model`` on ``records`` with every metric of ``docs/DESIGN.md`` ("Metrics"), batched.

    All teacher-forced metrics come from one batched pass over the distinct (prompt, target) probes;
    generation metrics from batched greedy decoding. Batching does not change any value (see
    ``scoring``); ``oracle.evaluate_oracle`` is the one-at-a-time implementation it is checked
    against.

    Args:
        model: the evaluated causal LM (put in eval mode during the call, then restored).
        tokenizer: its tokenizer.
        records: the facts.
        reference: the model before the update, or its ``reference_predictions``; None leaves
            Locality None.
        batch_size: rows per teacher-forced forward pass.
        generation_batch_size: rows per ``generate`` call (default ``batch_size``). A decoding step reads
            all weights once whatever the number of rows, but a batch decodes until its largest budget
            and pads to its longest prompt, so larger is not always faster (benchmarks/README.md).
        generation: compute Generation exact match (greedy decoding).
        fluency: compute Fluency (greedy decoding of ``fluency_tokens`` tokens: slow).
        fluency_tokens: new tokens generated for Fluency.
        fluency_sampled: compute the sampled Fluency (ROME/EasyEdit: top-5 sampling until prompt +
            continuation are 100 tokens: slow).
        fluency_seed: seeds the sampled Fluency (with each prompt's tokens: ``sampling.prompt_seed``).
        perplexity: also measure the model's perplexity on these held-out passages (general ability:
            ``EvalResult.perplexity``); None skips it.
        pack: share a row between targets after the same prompt.
        cache_dir: disk cache for reference predictions when ``reference`` is a model, and for the
            perplexity (by weights and passages).
        progress: show progress bars.
        template: the prompt template of every probe and generation (``data.templates``): the one the
            model was trained with. Under a template other than ``plain`` the Fluencies score the record's
            own prompt and the continuation, not the template's text.
        seed: recorded in the result (which training seed produced ``model``).
    Returns:
        ``EvalResult`` with per-record values and ``meta`` (settings, timings).
    """
    records = list(records)
    if batch_size < 1 or (generation_batch_size is not None and generation_batch_size < 1):
        raise FlearnError("batch size must be at least 1")
    gen_batch = generation_batch_size or batch_size
    if fluency and fluency_tokens < 1:
        raise FlearnError("fluency needs at least one generated token")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    ref = reference  # a model is turned into its predictions
    if ref is not None and not isinstance(ref, ReferencePredictions):
        if not hasattr(ref, "forward"):
            raise TypeError("reference must be a model, ReferencePredictions or None")
        ref = reference_predictions(
            ref,
            tokenizer,
            records,
            batch_size=batch_size,
            pack=pack,
            cache_dir=cache_dir,
            progress=progress,
            template=template,
        )
    timings["reference"] = time.perf_counter() - start

    plans = [record_probes(tokenizer, r, template) for r in records]

    def shown(prompt: list[int], ids: list[int], record: KnowledgeRecord) -> str:
        """The text a Fluency scores: prompt and continuation (the record's prompt under a template)."""
        if template == PLAIN:
            return tokenizer.decode([*prompt, *ids], skip_special_tokens=True)
        return f"{record.prompt} {tokenizer.decode(ids, skip_special_tokens=True).lstrip()}"

    probes, _ = unique_probes(p.all() for p in plans)
    pad_id, eos_id = pad_token_id(tokenizer), eos_token_id(tokenizer)
    prompts = [list(p.new.prompt_ids) for p in plans]
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        scores = score_probes(
            model, probes, pad_id=pad_id, batch_size=batch_size, pack=pack, progress=progress, desc="scoring"
        )
        timings["teacher_forced"] = time.perf_counter() - start
        generated: list[str | None] = [None] * len(records)
        if generation:
            start = time.perf_counter()
            budgets = [len(p.new.target_ids) + EXACT_MATCH_EXTRA_TOKENS for p in plans]
            new_ids = greedy_generate(
                model,
                prompts,
                budgets,
                pad_id=pad_id,
                eos_id=eos_id,
                batch_size=gen_batch,
                progress=progress,
                desc="generating",
            )
            generated = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]
            timings["generation"] = time.perf_counter() - start
        fluency_texts: list[str | None] = [None] * len(records)
        if fluency:
            start = time.perf_counter()
            long_ids = greedy_generate(
                model,
                prompts,
                [fluency_tokens] * len(prompts),
                pad_id=pad_id,
                eos_id=eos_id,
                batch_size=gen_batch,
                progress=progress,
                desc="fluency",
            )
            # ROME scores prompt + continuation.
            fluency_texts = [
                shown(prompt, ids, record)
                for prompt, ids, record in zip(prompts, long_ids, records, strict=True)
            ]
            timings["fluency"] = time.perf_counter() - start
        sampled_texts: list[str | None] = [None] * len(records)
        if fluency_sampled:
            start = time.perf_counter()
            sampled = sample_generate(
                model,
                prompts,
                [max(0, FLUENCY_SAMPLED_LENGTH - len(p)) for p in prompts],
                pad_id=pad_id,
                seed=fluency_seed,
                top_k=FLUENCY_SAMPLED_TOP_K,
                batch_size=gen_batch,
                progress=progress,
                desc="fluency (sampled)",
            )
            sampled_texts = [
                rome_text(shown(prompt, ids, record))
                for prompt, ids, record in zip(prompts, sampled, records, strict=True)
            ]
            timings["fluency_sampled"] = time.perf_counter() - start
        measured = None
        if perplexity is not None:
            from flearning.evaluation.perplexity import perplexity as measure_perplexity

            start = time.perf_counter()
            measured = measure_perplexity(
                model,
                tokenizer,
                perplexity.passages,
                max_tokens=perplexity.max_tokens,
                corpus=perplexity.corpus,
                cache_dir=cache_dir,
                progress=progress,
            ).to_json()
            timings["perplexity"] = time.perf_counter() - start
    finally:
        model.train(was_training)

    score = dict(zip(probes, scores, strict=True))
    rows = [
        record_metrics(r, p, score, ref, g, f, t)
        for r, p, g, f, t in zip(records, plans, generated, fluency_texts, sampled_texts, strict=True)
    ]
    meta = {
        "batch_size": batch_size,
        "generation_batch_size": gen_batch,
        "pack": pack,
        "generation": generation,
        "fluency": fluency,
        "fluency_tokens": fluency_tokens if fluency else None,
        "fluency_sampled": fluency_sampled,
        "fluency_seed": fluency_seed if fluency_sampled else None,
        "records": len(records),
        "probes": len(probes),
        "template": template,
        "reference_fingerprint": ref.model_fingerprint if ref is not None else None,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    return EvalResult(records=rows, seed=seed, meta=meta, perplexity=measured)


def teacher_forced_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pack: bool = True,
    progress: bool = False,
    template: str = PLAIN,
) -> list[float]:
    """Teacher-forced token accuracy of each ``(prompt, target)`` pair (0..1), batched.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        pairs: (prompt, target) texts, encoded with ``encode_pair``.
        batch_size: rows per forward pass.
        pack: share a row between targets after the same prompt.
        progress: show a progress bar.
        template: the prompt template (``data.templates``).
    Returns:
        One accuracy per pair, in order.
    """
    scores = pair_scores(
        model, tokenizer, pairs, batch_size=batch_size, pack=pack, progress=progress, template=template
    )
    return [s.accuracy for s in scores]


def pair_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pack: bool = True,
    progress: bool = False,
    template: str = PLAIN,
) -> list[ProbeScore]:
    """The teacher-forced score (accuracy, argmax, NLL) of each ``(prompt, target)`` pair, in order, from
    one batched pass over the distinct pairs (``teacher_forced_accuracy``'s arguments)."""
    probes = [encode_probe(tokenizer, prompt, target, template) for prompt, target in pairs]
    distinct, index = unique_probes([probes])
    was_training = model.training
    model.eval()
    try:
        scores = score_probes(
            model,
            distinct,
            pad_id=pad_token_id(tokenizer),
            batch_size=batch_size,
            pack=pack,
            progress=progress,
        )
    finally:
        model.train(was_training)
    return [scores[index[p]] for p in probes]


def pair_locality(reference: Sequence[Sequence[int]], scores: Sequence[ProbeScore]) -> float:
    """Locality (×100) of a model on pairs: the mean agreement of its argmax predictions (``scores``)
    with a reference model's (``reference``, the argmaxes of ``pair_scores`` on the model before the
    update), as the Locality metric computes it per probe."""
    if len(reference) != len(scores) or not scores:
        raise ValueError("pair_locality needs one reference prediction per score, and at least one")
    return (
        100.0
        * sum(argmax_agreement(r, s.argmax) for r, s in zip(reference, scores, strict=True))
        / len(scores)
    )
