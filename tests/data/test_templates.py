"""Prompt templates (issue #11): plain, alpaca (Stanford Alpaca's text), chat (the tokenizer's own);
training and evaluation encode a pair to the same ids under each, and the template joins the keys of
stages and bench runs only when it is not plain."""

from __future__ import annotations

import pytest

from flearning.config import BenchConfig, UpdateConfig, load_config, stage_plan
from flearning.data.encoding import encode_pair
from flearning.data.records import KnowledgeRecord, PromptAnswer
from flearning.data.templates import ALPACA_NO_INPUT, check_template
from flearning.errors import ConfigError, FlearnError
from flearning.evaluation.evaluate import evaluate, teacher_forced_accuracy
from flearning.evaluation.probes import record_probes
from flearning.recipes.bench_cache import run_key
from flearning.training.config import TrainConfig
from flearning.training.dataset import IGNORE_INDEX, build_examples
from tiny import tiny_llama, tiny_tokenizer

CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
PROMPT, ANSWER = "The capital of France is", "Paris"


def test_alpaca_text_is_stanford_alpacas_prompt_without_input():
    """tatsu-lab/stanford_alpaca train.py PROMPT_DICT["prompt_no_input"], character for character."""
    assert ALPACA_NO_INPUT.format(instruction="Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nQ?\n\n### Response:"
    )


def test_plain_is_the_encoding_without_a_template():
    tok = tiny_tokenizer()
    assert encode_pair(tok, PROMPT, ANSWER, template="plain") == encode_pair(tok, PROMPT, ANSWER)


@pytest.mark.parametrize(
    ("template", "prompt_text", "answer_text"),
    [
        ("plain", PROMPT, " Paris"),
        ("alpaca", ALPACA_NO_INPUT.format(instruction=PROMPT), " Paris"),
        ("chat", f"<user>{PROMPT}\n<assistant>", "Paris"),
    ],
)
def test_each_template_dresses_the_prompt_and_keeps_the_answer(template, prompt_text, answer_text):
    tok = tiny_tokenizer()  # one token per byte: the decoded parts are exactly the texts
    tok.chat_template = CHAT
    pair = encode_pair(tok, PROMPT, ANSWER, add_eos=True, template=template)
    assert tok.decode(pair.input_ids[: pair.prompt_len]) == prompt_text
    assert pair.target_ids[-1] == tok.eos_token_id
    assert tok.decode(pair.target_ids[:-1]) == answer_text
    assert pair.prompt_len == len(prompt_text.encode())


def test_chat_without_a_chat_template_is_refused():
    tok = tiny_tokenizer()
    with pytest.raises(FlearnError, match="has no chat template.*use --template plain or --template alpaca"):
        encode_pair(tok, PROMPT, ANSWER, template="chat")
    with pytest.raises(FlearnError, match="unknown prompt template 'vicuna'"):
        check_template(tok, "vicuna")


@pytest.mark.parametrize("template", ["plain", "alpaca", "chat"])
def test_training_and_scoring_see_the_same_ids(template):
    tok = tiny_tokenizer()
    tok.chat_template = CHAT
    record = KnowledgeRecord(
        id="0",
        prompt=PROMPT,
        target_old="Lyon",
        target_new=ANSWER,
        locality=[PromptAnswer(prompt="Water is", answer="wet")],
    )
    (learn,) = build_examples(tok, [record.new_pair], add_eos=False, template=template)
    (forget,) = build_examples(tok, [record.old_pair], add_eos=False, template=template)
    probes = record_probes(tok, record, template)
    for example, probe in ((learn, probes.new), (forget, probes.old)):
        assert example.input_ids == [*probe.prompt_ids, *probe.target_ids]
        assert example.labels == [IGNORE_INDEX] * len(probe.prompt_ids) + list(probe.target_ids)
    loc = encode_pair(tok, "Water is", "wet", template=template)
    assert probes.locality[0].prompt_ids == tuple(loc.input_ids[: loc.prompt_len])


def test_evaluation_records_its_template_and_scores_under_it():
    tok, model = tiny_tokenizer(), tiny_llama()
    records = [KnowledgeRecord(id="0", prompt=PROMPT, target_old="Lyon", target_new=ANSWER)]
    result = evaluate(model, tok, records, generation=False, progress=False, template="alpaca")
    assert result.meta["template"] == "alpaca"
    (accuracy,) = teacher_forced_accuracy(model, tok, [records[0].new_pair], template="alpaca")
    assert result.records[0]["reliability"] == pytest.approx(accuracy)


def test_a_stage_key_changes_only_with_a_template_other_than_plain():
    plain, alpaca = TrainConfig(), TrainConfig(template="alpaca")
    assert "template" not in plain.model_dump(mode="json")  # keys of earlier stages stay as they were
    assert alpaca.model_dump(mode="json")["template"] == "alpaca"
    records = [KnowledgeRecord(id="0", prompt=PROMPT, target_old="Lyon", target_new=ANSWER)]
    args = ("theta", records, "ft", None, plain, None)
    flags = {"generation": True, "fluency": False, "split": "eval"}
    assert run_key(*args, **flags) == run_key(*args, **flags, template="plain")
    assert run_key(*args, **flags) != run_key(*args, **flags, template="alpaca")


def test_config_threads_the_template_into_every_stage_and_refuses_it_for_editors():
    plan = stage_plan(UpdateConfig(method="flearning-lora-ft", template="alpaca"))
    assert (plan.forget.template, plan.learn.template) == ("alpaca", "alpaca")
    bench = load_config(BenchConfig, None, ["template=alpaca"], {"data": "samples"})
    assert bench.prime.train_config(0, bench.template).template == "alpaca"
    with pytest.raises(ConfigError) as info:
        load_config(UpdateConfig, None, ["method=rome", "template=alpaca"], {})
    assert (
        "template: template alpaca cannot be used with rome: the editors locate the subject and write the "
        "fact on the plain prompt (template plain)"
    ) in str(info.value)
    with pytest.raises(ConfigError, match="template: Input should be 'plain', 'alpaca' or 'chat'"):
        load_config(UpdateConfig, None, ["template=vicuna"], {})
