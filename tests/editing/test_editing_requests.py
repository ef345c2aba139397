"""Edit requests: the subject placeholder, the subject's last token, the sequences the methods read."""

from __future__ import annotations

import pytest

from flearning.data.records import KnowledgeRecord
from flearning.editing.requests import (
    CONTEXT_PREFIXES,
    as_request,
    edit_request,
    key_sequences,
    kl_sequence,
    rewrite_sequence,
    subject_last_index,
)
from flearning.errors import FlearnError


def test_a_placeholder_or_the_subject_itself():
    a = edit_request("The capital of {} is", "Freedonia", " Sylvania ")
    b = edit_request("The capital of Freedonia is", "Freedonia", "Sylvania")
    assert a == b
    assert a.prompt == "The capital of Freedonia is" and a.subject_start == 15 and a.target_new == "Sylvania"
    assert a.prompt[a.subject_start : a.subject_end] == "Freedonia"


@pytest.mark.parametrize(
    "prompt, subject, target, message",
    [
        ("{} and {} are", "X", "y", "once"),
        ("Nothing here", "Freedonia", "y", "not in the prompt"),
        ("{} is", " ", "y", "non-empty subject"),
        ("{} is", "X", "  ", "target_new is empty"),
    ],
)
def test_bad_requests_say_what_to_change(prompt, subject, target, message):
    with pytest.raises(FlearnError, match=message):
        edit_request(prompt, subject, target)


def test_requests_from_mappings_and_records():
    rome_style = {"prompt": "{} plays the", "subject": "Ada", "target_new": {"str": "cello"}}
    assert as_request(rome_style) == edit_request("Ada plays the", "Ada", "cello")
    record = KnowledgeRecord(
        id="r1", prompt="Ada plays the", target_old="harp", target_new="cello", subject="Ada"
    )
    assert as_request(record) == edit_request("Ada plays the", "Ada", "cello")
    with pytest.raises(FlearnError, match="record r1: .*subject"):
        as_request(record.model_copy(update={"subject": None}))
    with pytest.raises(FlearnError, match="missing subject"):
        as_request({"prompt": "x", "target_new": "y"})


def test_the_subjects_last_token(tok):
    text = "The capital of Freedonia is"
    ids, index = subject_last_index(tok, text, 15, 24)
    assert tok.decode(ids[index]) == "a" and tok.decode(ids[: index + 1]) == "The capital of Freedonia"

    class Slow:  # ROME's way, for tokenizers without character offsets
        is_fast = False

        def __call__(self, text, **kwargs):
            return tok(text, **kwargs)

    assert subject_last_index(Slow(), text, 15, 24) == (ids, index)


def test_rewrite_kl_and_key_sequences(tok):
    request = edit_request("The capital of {} is", "Freedonia", "Sylvania")
    seq = rewrite_sequence(tok, request, 0, CONTEXT_PREFIXES[0])
    # the input lacks the target's last token; the positions from the prompt's last token predict it
    assert tok.decode(seq.ids) == CONTEXT_PREFIXES[0] + "The capital of Freedonia is Sylvani"
    assert tok.decode(list(seq.targets)) == " Sylvania"
    assert seq.predict_from + len(seq.targets) == len(seq.ids)
    assert tok.decode(seq.ids[: seq.lookup + 1]).endswith("Freedonia")
    kl = kl_sequence(tok, request, 0)
    assert tok.decode(kl.ids) == "Freedonia is a" and tok.decode(kl.ids[: kl.lookup + 1]) == "Freedonia"
    keys = key_sequences(tok, [request, request], CONTEXT_PREFIXES)
    assert len(keys) == 2 * (1 + len(CONTEXT_PREFIXES))
    assert tok.decode(keys[0].ids) == "The capital of Freedonia is"
    assert [k.request for k in keys] == [0] * 6 + [1] * 6
