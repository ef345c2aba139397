"""Exact-match normalisation and ROME's n-gram entropy on known strings."""

from __future__ import annotations

import math

import pytest

from flearning.evaluation.text import (
    compute_n_gram_entropy,
    exact_match,
    n_gram_entropy,
    normalize_text,
    word_tokens,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Paris.  ", "paris"),
        ("PARIS", "paris"),
        ("New\n  York\tCity!", "new york city"),
        ('"Rome," he said', 'rome," he said'),  # only the ends are stripped
        ("... . Oslo ?!", "oslo"),
        ("U.S. Army", "u.s. army"),
        ("", ""),
        ("?!", ""),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


@pytest.mark.parametrize(
    ("generated", "target", "expected"),
    [
        (" Paris, the capital", "Paris", 1.0),
        (" paris.", "Paris", 1.0),
        ("  Keir   Starmer is", "Keir Starmer", 1.0),
        (" Keir\nStarmer", "Keir Starmer", 1.0),
        (" the city of Paris", "Paris", 0.0),  # must start with the target
        (" Par", "Paris", 0.0),
        ("'Sega' games", "Sega", 1.0),
        ("anything", "  ", 0.0),  # an empty target never matches
        # whole words only: the target must end on a word boundary of the generation
        (" India is a country", "India", 1.0),
        (" India.", "India", 1.0),
        (" India", "India", 1.0),
        (" Indian Ocean", "India", 0.0),
        (" Parisian cafés", "Paris", 0.0),
        (" Paris-based", "Paris", 1.0),  # a hyphen ends the word
        (" Keir Starmer's cabinet", "Keir Starmer", 1.0),
        (" 3.5 km", "3.5", 1.0),
        (" 3.55 km", "3.5", 0.0),
        (" 1990s", "1990", 0.0),
        (" U.S. Army", "U.S.", 1.0),  # the target's own final dot is stripped; the next char is '.'
        (" New York City", "New York", 1.0),
        (" New Yorker", "New York", 0.0),
        (" Straße 5", "Straße", 1.0),
        (" Straßen", "Straße", 0.0),
        # scripts without spaces between words match by prefix
        ("北京是中国的首都", "北京", 1.0),
        ("東京都", "東京", 1.0),
    ],
)
def test_exact_match(generated, target, expected):
    assert exact_match(generated, target) == expected


def test_word_tokens_split_punctuation():
    assert word_tokens("Hello, world! It's 3.5 km.") == ["Hello", ",", "world", "!", "It's", "3.5", "km", "."]


def test_entropy_of_distinct_words():
    # "a b c d": 3 distinct bigrams -> log2(3) bits; 2 distinct trigrams -> 1 bit.
    expected = (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2
    assert compute_n_gram_entropy("a b c d") == pytest.approx(expected)


def test_entropy_of_repetition_is_zero():
    assert compute_n_gram_entropy("the the the the the") == 0.0


def test_entropy_with_repeated_ngrams():
    # tokens: the cat the cat the
    # bigrams: (the,cat) x2, (cat,the) x2 -> 1 bit
    # trigrams: (the,cat,the) x2, (cat,the,cat) x1 -> H(2/3, 1/3)
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert compute_n_gram_entropy("the cat the cat the") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * h3) / 2)
    assert compute_n_gram_entropy("the cat the cat the", agg="geom") == pytest.approx(
        math.sqrt(2 / 3 * 1.0 * 4 / 3 * h3)
    )


def test_entropy_of_short_text_is_zero():
    assert compute_n_gram_entropy("one") == 0.0
    assert compute_n_gram_entropy("") == 0.0


def test_entropy_weights_and_orders():
    # Unit weight on bigrams only: plain bigram entropy.
    assert compute_n_gram_entropy("a b c d", ns=[2], weights=[1.0]) == pytest.approx(math.log2(3))
    with pytest.raises(ValueError):
        compute_n_gram_entropy("a b", agg="median")
    with pytest.raises(ValueError):
        compute_n_gram_entropy("a b", ns=[2, 3], weights=[1.0])


def test_n_gram_entropy_averages_texts():
    texts = ["a b c d", "the the the the"]
    assert n_gram_entropy(texts) == pytest.approx(compute_n_gram_entropy("a b c d") / 2)
    assert math.isnan(n_gram_entropy([]))
