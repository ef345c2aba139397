"""The held-out text a model's perplexity is measured on: passages of a plain text file.

A passage is a block of text between blank lines (a paragraph); the default corpus is the shipped
``sample:wikitext-2-valid-200.txt`` (200 WikiText-2 validation paragraphs, CC BY-SA 3.0, attributed in
``resources/samples/README.md``). Pure Python: the CLI and the configs read it without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from flearning.errors import FlearnError
from flearning.evaluation.definitions import (
    DEFAULT_PERPLEXITY_MAX_TOKENS,
    DEFAULT_PERPLEXITY_PASSAGES,
    PERPLEXITY_SAMPLE,
)
from flearning.resources import SAMPLE_PREFIX, resolve_sample

DEFAULT_CORPUS = f"{SAMPLE_PREFIX}{PERPLEXITY_SAMPLE}"
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclass(frozen=True)
class PerplexityCorpus:
    """What ``evaluate(perplexity=...)`` measures perplexity on: the passages and how they are cut."""

    passages: tuple[str, ...]
    max_tokens: int = DEFAULT_PERPLEXITY_MAX_TOKENS
    corpus: str | None = None  # where they came from, recorded in the result

    @classmethod
    def load(
        cls,
        corpus: str | Path = DEFAULT_CORPUS,
        passages: int | None = DEFAULT_PERPLEXITY_PASSAGES,
        max_tokens: int = DEFAULT_PERPLEXITY_MAX_TOKENS,
    ) -> PerplexityCorpus:
        """The first ``passages`` passages of a corpus file (``load_passages``; FlearnError if unusable)."""
        return cls(tuple(load_passages(corpus, passages)), max_tokens, str(corpus))


def corpus_path(corpus: str | Path) -> Path:
    """The file of a corpus: ``sample:NAME`` is a shipped sample, anything else a path."""
    return resolve_sample(corpus)


def split_passages(text: str) -> list[str]:
    """The passages of a text: blocks between blank lines, stripped, empty ones left out."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [block.strip() for block in _BLANK_LINES.split(text) if block.strip()]


def load_passages(corpus: str | Path, limit: int | None = None) -> list[str]:
    """The first ``limit`` passages (all when None) of a corpus file (UTF-8 text).

    Raises:
        FlearnError: the file cannot be read, is not UTF-8 text, or holds no passage.
    """
    path = corpus_path(corpus)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FlearnError(f"{corpus}: perplexity corpus not found") from None
    except UnicodeDecodeError as ex:
        raise FlearnError(f"{corpus}: the perplexity corpus is not UTF-8 text ({ex.reason})") from None
    except OSError as ex:
        raise FlearnError(f"{corpus}: cannot read the perplexity corpus: {ex.strerror or ex}") from None
    passages = split_passages(text)
    if not passages:
        raise FlearnError(
            f"{corpus}: the perplexity corpus holds no text (passages are separated by blank lines)"
        )
    return passages if limit is None else passages[:limit]
