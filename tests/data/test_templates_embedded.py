"""The templates on a real sample record with the embedded SmolLM2-135M tokenizer (issue #11): the exact
token ids of one record under each template, the same for training and for scoring."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from flearning.data import load_dataset
from flearning.evaluation.probes import record_probes
from flearning.models import ensure_embedded
from flearning.resources import sample_path
from flearning.training.dataset import IGNORE_INDEX, build_examples

pytestmark = pytest.mark.slow

QUESTION = [
    1780,
    314,
    260,
    15896,
    282,
    1661,
    7481,
    407,
    7160,
    47,
]  # "What is the publisher of Clutch Hitter?"
ALPACA_HEAD = [19798, 314, 354, 5785, 338, 6601, 253, 3856, 30, 9517, 253, 2426, 338, 13674, 32873, 260]
ALPACA_HEAD += [3116, 30, 198, 198, 3757, 20880, 42, 198]  # "... the request.\n\n### Instruction:\n"
ALPACA_TAIL = [198, 198, 3757, 14212, 42]  # "\n\n### Response:"
# SmolLM2's chat template: its default system message, the user turn, the assistant's turn opened
CHAT_HEAD = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407]
CHAT_HEAD += [19712, 8182, 2, 198, 1, 4093, 198]
CHAT_TAIL = [2, 198, 1, 520, 9531, 198]
EXPECTED = {  # (prompt ids, ids of the new answer 'Cinematronics', ids of the old answer 'Viking Press')
    "plain": (QUESTION, [30280, 15519, 20815], [24623, 4063]),
    "alpaca": ([*ALPACA_HEAD, *QUESTION, *ALPACA_TAIL], [30280, 15519, 20815], [24623, 4063]),
    "chat": ([*CHAT_HEAD, *QUESTION, *CHAT_TAIL], [51, 254, 15519, 20815], [43298, 644, 4063]),
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_embedded())


@pytest.mark.parametrize("template", list(EXPECTED))
def test_sample_record_ids_per_template(tokenizer, template):
    record = load_dataset(sample_path("zsre-200.json")).records[1]  # pred: the old answer is 'Viking Press'
    assert (record.prompt, record.target_old, record.target_new) == (
        "What is the publisher of Clutch Hitter?",
        "Viking Press",
        "Cinematronics",
    )
    prompt, new, old = EXPECTED[template]
    probes = record_probes(tokenizer, record, template)
    assert (list(probes.new.prompt_ids), list(probes.new.target_ids)) == (prompt, new)
    assert list(probes.old.target_ids) == old
    eos = tokenizer.eos_token_id
    (learn,) = build_examples(tokenizer, [record.new_pair], add_eos=True, template=template)
    (forget,) = build_examples(tokenizer, [record.old_pair], add_eos=True, template=template)
    assert learn.input_ids == [*prompt, *new, eos]
    assert learn.labels == [IGNORE_INDEX] * len(prompt) + [*new, eos]
    assert forget.input_ids == [*probes.old.prompt_ids, *probes.old.target_ids, eos]
