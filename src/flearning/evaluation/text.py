"""Text-level metrics: exact-match normalisation and ROME's n-gram entropy (fluency).

Pure Python, no torch: these run on decoded generations.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_WHITESPACE = re.compile(r"\s+")
# Approximates nltk.word_tokenize (Treebank) without the nltk dependency: words (with internal
# hyphens, dots or apostrophes kept) and every other non-space character as its own token.
_WORD = re.compile(r"\w+(?:[-.']\w+)*|[^\w\s]")
_EDGE_PUNCTUATION = string.punctuation + "“”‘’«»…–—"
# Scripts written without spaces between words: CJK ideographs, kana, Thai, Lao, Khmer, Myanmar.
_UNSPACED = re.compile(
    "[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
)


def normalize_text(text: str) -> str:
    """Lowercase, collapse white space and strip punctuation at both ends.

    Args:
        text: any text, e.g. a decoded generation or a target.
    Returns:
        The normalized text (internal punctuation kept: "U.S. Army" -> "u.s. army").
    """
    text = _WHITESPACE.sub(" ", text.lower()).strip()
    # Strip punctuation and the white space it uncovers, alternately, until stable (". Paris ." -> "paris").
    previous = None
    while previous != text:
        previous = text
        text = text.strip(_EDGE_PUNCTUATION).strip()
    return text


def _continues_word(before: str, after: str) -> bool:
    """Whether ``after`` continues the word that ends with ``before`` (both single characters): two word
    characters in a row, unless either is from a script written without spaces between words."""
    if not (before.isalnum() or before == "_") or not (after.isalnum() or after == "_"):
        return False
    return not (_UNSPACED.match(before) or _UNSPACED.match(after))


def exact_match(generated: str, target: str) -> float:
    """1.0 if the normalized generation starts with the normalized target as whole words, else 0.0.

    The target must end on a word boundary of the generation: "India" matches "India is" and
    "India." but not "Indian Ocean" (a target ending in a word character must not be followed by
    another). Scripts written without spaces (Chinese, Japanese, Thai) have no such boundary and match
    by prefix.

    Args:
        generated: the decoded new tokens (without the prompt).
        target: the expected answer.
    Returns:
        1.0 or 0.0. An empty normalized target never matches.
    """
    want = normalize_text(target)
    have = normalize_text(generated)
    if not want or not have.startswith(want):
        return 0.0
    return float(len(have) == len(want) or not _continues_word(want[-1], have[len(want)]))


def word_tokens(text: str) -> list[str]:
    """Word tokens used for n-gram entropy (see ``_WORD``)."""
    return _WORD.findall(text)


def ngram_frequencies(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of the consecutive ``n``-grams of ``tokens``."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    if total == 0:
        return 0.0  # ROME: the sum over an empty distribution is 0
    return -sum((c / total) * math.log2(c / total) for c in counts.values())


def compute_n_gram_entropy(
    sentence: str,
    ns: Sequence[int] = (2, 3),
    weights: Sequence[float] = (2 / 3, 4 / 3),
    agg: str = "arith",
) -> float:
    """ROME's ``compute_n_gram_entropy``: weighted n-gram entropies (bits) of one text, aggregated.

    For each ``n`` the Shannon entropy (base 2) of the n-gram frequency distribution is multiplied by
    its weight; the weighted values are then averaged (``arith``) or geometrically averaged (``geom``).
    With the defaults this is ``(2/3 · H2 + 4/3 · H3) / 2``.

    Args:
        sentence: the text (ROME feeds prompt + generated continuation).
        ns: n-gram orders.
        weights: one weight per order.
        agg: ``"arith"`` or ``"geom"``.
    Returns:
        The aggregated entropy in bits (0.0 for texts with fewer than ``min(ns)`` word tokens).
    """
    if agg not in ("arith", "geom"):
        raise ValueError(f"agg must be 'arith' or 'geom', not {agg!r}")
    if len(ns) != len(weights):
        raise ValueError("ns and weights must have the same length")
    tokens = word_tokens(sentence)
    weighted = [w * _entropy_bits(ngram_frequencies(tokens, n)) for n, w in zip(ns, weights, strict=True)]
    if agg == "arith":
        return sum(weighted) / len(weighted)
    if any(v <= 0 for v in weighted):
        return 0.0
    return math.exp(sum(math.log(v) for v in weighted) / len(weighted))


def n_gram_entropy(texts: Sequence[str], agg: str = "arith") -> float:
    """ROME's ``n_gram_entropy``: ``compute_n_gram_entropy`` averaged over texts.

    Args:
        texts: generations (prompt + continuation).
        agg: ``"arith"`` or ``"geom"`` mean over texts.
    Returns:
        The mean entropy in bits (nan for no texts).
    """
    values = [compute_n_gram_entropy(t) for t in texts]
    if not values:
        return math.nan
    if agg == "arith":
        return sum(values) / len(values)
    if any(v <= 0 for v in values):
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))
