"""Metric names, display labels and the exact definitions quoted in every report.

Kept free of torch so that reports, tables and the CLI's help can use them cheaply.
"""

from __future__ import annotations

# Rows per teacher-forced forward pass and per generate call. Results do not depend on it (batched ==
# one at a time, tested); the value is the fastest measured by benchmarks/eval_throughput.py.
DEFAULT_BATCH_SIZE = 64

# Order used in every table and plot.
METRICS: tuple[str, ...] = (
    "reliability",
    "generality",
    "locality",
    "portability",
    "old_retention",
    "efficacy",
    "paraphrase",
    "gen_exact_match",
    "fluency",
    "fluency_sampled",
)

METRIC_LABELS: dict[str, str] = {
    "reliability": "Reliability",
    "generality": "Generality",
    "locality": "Locality",
    "portability": "Portability",
    "old_retention": "Old retention",
    "efficacy": "Efficacy",
    "paraphrase": "Paraphrase score",
    "gen_exact_match": "Generation exact match",
    "fluency": "Fluency (greedy)",
    "fluency_sampled": "Fluency (top-5 sampled, ROME/EasyEdit)",
}

METRIC_DEFINITIONS: dict[str, str] = {
    "reliability": (
        "Teacher-forced token accuracy of target_new after the edit prompt: the text is prompt + ' ' + "
        "target_new and a target token counts as correct when the argmax of the logits at the position "
        "before it equals it; averaged over the target tokens."
    ),
    "generality": (
        "Teacher-forced token accuracy of target_new after each rephrased prompt, averaged over the "
        "record's rephrases (records without rephrases are excluded)."
    ),
    "locality": (
        "For each locality prompt + ' ' + answer, the fraction of answer positions whose argmax token is "
        "the same for the evaluated model and the reference model (the model before the update), averaged "
        "over the record's locality pairs; whether the answer is correct does not matter."
    ),
    "portability": (
        "Teacher-forced token accuracy of each portability answer after its question, averaged over the "
        "record's portability pairs (records without them are excluded)."
    ),
    "old_retention": (
        "Teacher-forced token accuracy of target_old after the edit prompt (lower after an update means "
        "the old fact was forgotten)."
    ),
    "efficacy": (
        "1 if the mean per-token negative log-likelihood of target_new after the edit prompt is strictly "
        "lower than that of target_old, else 0 (ROME efficacy score)."
    ),
    "paraphrase": (
        "The efficacy comparison (mean per-token NLL of target_new < that of target_old) on each rephrased "
        "prompt, averaged over the record's rephrases (ROME paraphrase score)."
    ),
    "gen_exact_match": (
        "Greedy decoding of len(target_new tokens) + 3 new tokens after the edit prompt (stopping at EOS); "
        "1 if the normalized output (lowercased, white space collapsed, punctuation stripped at both ends) "
        "starts with the normalized target_new as whole words (the target must end on a word boundary: "
        "'India' does not match 'Indian Ocean'; scripts without spaces, such as Chinese, match by prefix), "
        "else 0."
    ),
    "fluency": (
        "Weighted n-gram entropy (ROME/EasyEdit: mean of 2/3 x bigram entropy and 4/3 x trigram entropy, "
        "in bits, over word tokens) of the prompt followed by a GREEDY continuation of a fixed number of "
        "new tokens (50 by default, stopping at EOS); reported x100 like ROME, not a percentage. Greedy "
        "decoding repeats itself more than sampling: compare with 'Fluency (top-5 sampled)', not with "
        "published ROME/EasyEdit fluency."
    ),
    "fluency_sampled": (
        "The same weighted n-gram entropy of the text ROME's generate_fast gives EasyEdit's "
        "test_generation_quality: the edit prompt continued by top-5 sampling (each token drawn from the 5 "
        "most likely, their probabilities renormalised) until prompt + continuation are 100 tokens long, "
        "not stopping at EOS, decoded without special tokens, NFKD-normalised, blank lines as a space; "
        "seeded per prompt (fluency_seed, default 0). Reported x100 like ROME and EasyEdit's KnowEdit "
        "results: this is the number to compare with theirs."
    ),
}

# Metrics whose per-record value is a fraction in [0, 1] (shown as %); the fluencies are entropies in bits.
ENTROPY_METRICS: tuple[str, ...] = ("fluency", "fluency_sampled")
PERCENT_METRICS: tuple[str, ...] = tuple(m for m in METRICS if m not in ENTROPY_METRICS)

# New tokens greedily decoded for exact match beyond the target's own length.
EXACT_MATCH_EXTRA_TOKENS = 3
DEFAULT_FLUENCY_TOKENS = 50
# The sampled Fluency, as ROME's generate_fast called by EasyEdit's test_generation_quality: top-k
# sampling until the text (prompt included) is this many tokens long.
FLUENCY_SAMPLED_TOP_K = 5
FLUENCY_SAMPLED_LENGTH = 100
DEFAULT_FLUENCY_SEED = 0

# General ability: perplexity on a held-out text corpus (not a per-record metric: one value per model).
# The default corpus is 200 WikiText-2 validation paragraphs shipped with the package (resources/samples).
PERPLEXITY_SAMPLE = "wikitext-2-valid-200.txt"
DEFAULT_PERPLEXITY_PASSAGES = 200
DEFAULT_PERPLEXITY_MAX_TOKENS = 256
# Tokens per forward pass of the perplexity evaluation (rows x longest passage in the batch): bounds the
# memory of the [tokens, vocab] logits (2048 x 49152 floats = 0.4 GB for SmolLM2).
PERPLEXITY_BATCH_TOKENS = 2048
PERPLEXITY_DEFINITION = (
    "Token-level perplexity on a held-out text corpus: exp of the mean negative log-likelihood (nats) "
    "over every predicted token of every passage (a passage's first token has no prediction); passages "
    "are cut to their first max_tokens tokens. Lower is better; an update that damages the model's "
    "general language ability raises it. Not a percentage."
)
