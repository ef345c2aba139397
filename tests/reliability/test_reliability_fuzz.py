"""Fuzzing the entry points that read user input: the run configuration and the bench configuration (YAML
file + key=value overrides) and the data files. Whatever they are given, they return a valid object or
raise ``FlearnError``; nothing else escapes (no traceback for a user's mistake)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from flearning.config import (
    PROFILES,
    BenchConfig,
    PrimeSettings,
    UpdateConfig,
    load_config,
    stage_plan,
)
from flearning.data import FORMATS, load_dataset
from flearning.errors import ConfigError, FlearnError
from flearning.methods import METHODS
from flearning.training import TrainConfig

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

TOP_KEYS = list(UpdateConfig.model_fields) + ["lambda"]
STAGE_KEYS = [
    "lr",
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum",
    "scheduler",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "add_eos",
    "freeze_embeddings",
]
LORA_KEYS = ["r", "alpha", "dropout", "target_modules"]
DOTTED = (
    TOP_KEYS
    + [f"{s}.{k}" for s in ("learn", "forget") for k in STAGE_KEYS]
    + [f"lora.{k}" for k in LORA_KEYS]
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.sampled_from(
        [
            "5e-5",
            "1E-3",
            "3",
            "-0",
            ".nan",
            "inf",
            "fast",
            "",
            "all-linear",
            "flearning-ft",
            "ft",
            "linear",
            "[q_proj]",
            "~",
            "2**32",
            "1e400",
            "\x00",
            "é",
        ]
    )
    | st.text(max_size=10)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(STAGE_KEYS + LORA_KEYS) | st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


UPDATE_SECTIONS = {"learn": STAGE_KEYS, "forget": STAGE_KEYS, "lora": LORA_KEYS}


@st.composite
def config_documents(draw, top_keys=TOP_KEYS, sections=UPDATE_SECTIONS, value_strategy=values) -> bytes:
    """A YAML file: mostly a mapping of known keys to random values, sometimes mangled or random bytes."""
    kind = draw(st.sampled_from(["mapping", "mapping", "mapping", "mangled", "bytes", "scalar"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "scalar":
        return yaml.safe_dump(draw(value_strategy)).encode()
    doc = {}
    for key in draw(st.lists(st.sampled_from(top_keys) | st.text(max_size=6), max_size=6)):
        if key in sections and draw(st.booleans()):
            doc[key] = {
                k: draw(value_strategy) for k in draw(st.lists(st.sampled_from(sections[key]), max_size=4))
            }
        else:
            doc[key] = draw(value_strategy)
    text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()))
    if kind == "mangled":
        cut = draw(st.integers(0, len(text)))
        text = (
            text[:cut]
            + draw(
                st.sampled_from(
                    [
                        "",
                        ":",
                        "- ",
                        "{",
                        "[",
                        "&a ",
                        "*a",
                        "!!python/object:os.system ",
                        "\t",
                        "'",
                        '"',
                        "\n  x: 1\n",
                    ]
                )
            )
            + text[cut + draw(st.integers(0, 3)) :]
        )
    return text.encode("utf-8", "surrogatepass")


OVERRIDE_VALUES = st.sampled_from(
    [
        "5e-5",
        "1e-2",
        ".nan",
        "[q_proj, v_proj]",
        "{a: 1}",
        "true",
        "-3",
        "x",
        "",
        "[",
        "!!binary aGk=",
        "1e400",
        "2e9",
    ]
)


def override_lists(dotted: list[str]):
    """Lists of ``key=value`` overrides: known dotted keys or random text, mostly YAML-ish values."""
    return st.lists(
        st.builds(
            lambda k, sep, v: f"{k}{sep}{v}",
            st.sampled_from(dotted) | st.text(max_size=8),
            st.sampled_from(["=", "=", "=", "", "=="]),
            OVERRIDE_VALUES | st.text(max_size=8),
        ),
        max_size=4,
    )


overrides = override_lists(DOTTED)


def check_config(cfg: UpdateConfig) -> None:
    """What a config that loaded promises, down to the stages' TrainConfigs it makes."""
    assert isinstance(cfg, UpdateConfig)
    assert isinstance(cfg.lam, float) and math.isfinite(cfg.lam)
    assert 0 <= cfg.seed < 2**32 and not isinstance(cfg.seed, bool)
    for stage in (cfg.learn, cfg.forget):
        for name in ("lr", "epochs", "warmup_ratio", "weight_decay", "max_grad_norm"):
            value = getattr(stage, name)
            assert value is None or (isinstance(value, float) and math.isfinite(value))
        for name in ("max_steps", "batch_size", "grad_accum"):
            value = getattr(stage, name)
            assert value is None or (type(value) is int and value >= 1)
        for name in ("add_eos", "freeze_embeddings"):
            assert getattr(stage, name) in (None, True, False)
    assert math.isfinite(cfg.lora.alpha) and math.isfinite(cfg.lora.dropout) and type(cfg.lora.r) is int
    for name in ("evaluate", "generation", "overwrite", "trust_remote_code"):
        assert type(getattr(cfg, name)) is bool
    # Every setting was checked when the config loaded: building the stages cannot fail after that.
    plan = stage_plan(cfg)
    stages = [plan.learn] + ([plan.forget] if plan.forget is not None else [])
    for train_cfg in stages:
        assert isinstance(train_cfg, TrainConfig)
        assert all(math.isfinite(v) for v in (train_cfg.lr, train_cfg.epochs, train_cfg.weight_decay))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-reliability")


@FUZZ
@given(doc=config_documents(), pairs=overrides, use_file=st.booleans())
# found by hand before the fuzzer could: each was accepted (or crashed building the stages)
@example(doc=b"", pairs=["learn.weight_decay=1e400"], use_file=False)
@example(doc=b"", pairs=["learn.weight_decay=.inf"], use_file=False)
@example(doc=b"forget:\n  max_grad_norm: .inf\n", pairs=[], use_file=True)
@example(doc=b"", pairs=["lora.alpha=.inf"], use_file=False)
@example(doc=b"", pairs=["learn.scheduler=bogus"], use_file=False)
@example(doc=b"learn:\n  epochs: true\n  batch_size: true\nseed: true\n", pairs=[], use_file=True)
@example(doc=b'overwrite: "yes"\nevaluate: "off"\nlearn:\n  lr: "1_0"\n', pairs=[], use_file=True)
def test_config_entry_point_raises_only_flearn_errors(fuzz_dir, doc, pairs, use_file):
    path = fuzz_dir / "config.yaml"
    path.write_bytes(doc)
    try:
        cfg = load_config(UpdateConfig, path if use_file else None, pairs)
    except FlearnError as err:
        event("FlearnError")
        assert str(err)
        return
    event("loaded")
    check_config(cfg)


# ---- the bench configuration -----------------------------------------------------------------------

PRIME_KEYS = list(PrimeSettings.model_fields)
BENCH_STAGES = ("full", "lora_stage", "forget_full", "forget_lora")
BENCH_SECTIONS = {
    "prime": PRIME_KEYS,
    **dict.fromkeys(BENCH_STAGES, [*STAGE_KEYS, "compile"]),
    "lora": LORA_KEYS,
    "data": ["zsre", "cache", "summary.json", "", ".hidden", "a/b"],
}
BENCH_KEYS = list(BenchConfig.model_fields)
BENCH_DOTTED = (
    BENCH_KEYS
    + [f"prime.{k}" for k in PRIME_KEYS]
    + [f"{s}.{k}" for s in BENCH_STAGES for k in STAGE_KEYS]
    + [f"lora.{k}" for k in LORA_KEYS]
)
# λ lists, seed lists and "auto" besides the values of the run configuration
bench_values = (
    values
    | st.just("auto")
    | st.lists(
        st.floats()
        | st.integers(-(2**33), 2**33)
        | st.booleans()
        | st.sampled_from(["5e-5", "'1e-1'", ".inf", "1e400", "auto", "1_0"]),
        max_size=4,
    )
)


def floats_in(node):
    """Every float in a dumped configuration (nested dicts and lists)."""
    if isinstance(node, float):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from floats_in(value)
    elif isinstance(node, list | tuple):
        for value in node:
            yield from floats_in(value)


def check_bench_config(cfg: BenchConfig) -> None:
    """What a bench configuration that loaded promises, down to the TrainConfigs of its stages."""
    assert isinstance(cfg, BenchConfig)
    assert all(math.isfinite(v) for v in floats_in(cfg.model_dump())), cfg
    for value in (cfg.n, cfg.n_val, cfg.eval_batch_size, cfg.prime.batch_size, *cfg.seeds):
        assert type(value) is int
    assert cfg.seeds and all(0 <= seed < 2**32 for seed in cfg.seeds)
    assert cfg.lambda_grid and all(type(v) is float for v in cfg.lambda_grid)
    if cfg.lambdas == "auto":
        assert cfg.n_val >= 1
    else:
        assert cfg.lambdas and all(type(v) is float for v in cfg.lambdas)
    for name in ("generation", "fluency", "trust_remote_code"):
        assert type(getattr(cfg, name)) is bool
    # as the bench builds them (every method: all four stage sections): cannot fail once the config loaded
    for seed in cfg.seeds[:2]:
        cfg.prime.train_config(seed)
        for method in METHODS.values():
            plan = cfg.stage_plan(method, seed)
            for train_cfg in filter(None, (plan.learn, plan.forget)):
                assert all(math.isfinite(v) for v in (train_cfg.lr, train_cfg.epochs, train_cfg.weight_decay))


@FUZZ
@given(
    doc=config_documents(BENCH_KEYS, BENCH_SECTIONS, bench_values),
    pairs=override_lists(BENCH_DOTTED),
    use_file=st.booleans(),
    profile=st.none() | st.sampled_from([*PROFILES, "nope"]),
)
# found by hand: each was accepted before the bench configuration took the strict types
@example(doc=b"linf_bound: .inf\nlocality_tolerance: 1e400\n", pairs=[], use_file=True, profile=None)
@example(doc=b"", pairs=["lambda_grid=[0.1, .inf]", "locality_tolerance=.nan"], use_file=False, profile=None)
@example(
    doc=b"n: true\ngeneration: 'yes'\nprime:\n  max_epochs: true\n", pairs=[], use_file=True, profile=None
)
@example(doc=b"", pairs=["lambda_grid=[]", "seeds=[-1]"], use_file=False, profile="quick")
def test_bench_config_entry_point_raises_only_config_errors(fuzz_dir, doc, pairs, use_file, profile):
    """The bench configuration (profile < YAML file < key=value overrides): a valid ``BenchConfig`` whose
    every float is finite, or a ``ConfigError`` (exit 2, every problem named); never another exception."""
    path = fuzz_dir / "bench.yaml"
    path.write_bytes(doc)
    try:
        cfg = load_config(BenchConfig, path if use_file else None, pairs, profile=profile)
    except ConfigError as err:
        event("ConfigError")
        assert str(err) and err.exit_code == 2
        return
    event("loaded")
    check_bench_config(cfg)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "prompt",
                    "target_old",
                    "target_new",
                    "src",
                    "alt",
                    "answers",
                    "rephrase",
                    "loc",
                    "loc_ans",
                    "requested_rewrite",
                    "ground_truth",
                    "id",
                    "locality",
                ]
            )
            | st.text(max_size=6),
            inner,
            max_size=5,
        )
    ),
    max_leaves=15,
)


@st.composite
def data_files(draw) -> tuple[str, bytes, str | None]:
    kind = draw(st.sampled_from(["bytes", "json", "jsonl", "mangled", "bom", "facts", "facts"]))
    if kind == "bytes":
        data = draw(st.binary(max_size=300))
    elif kind == "facts":  # our JSONL format, records often valid, so that loads succeed too
        words = st.sampled_from(
            ["Paris", "Rome", " ", "", "x", "The capital of France is", "é\u2028"]
        ) | st.text(max_size=8)
        records = [
            {"prompt": draw(words), "target_old": draw(words), "target_new": draw(words)}
            for _ in range(draw(st.integers(1, 4)))
        ]
        data = "\n".join(json.dumps(r) for r in records).encode("utf-8", "surrogatepass")
    elif kind == "json":
        data = json.dumps(draw(json_values)).encode()
    else:
        lines = [
            json.dumps(draw(json_values), ensure_ascii=draw(st.booleans()))
            for _ in range(draw(st.integers(0, 4)))
        ]
        text = "\n".join(lines)
        if kind == "mangled":
            cut = draw(st.integers(0, len(text)))
            text = text[:cut] + draw(st.text(max_size=3)) + text[cut:]
        data = text.encode("utf-8", "surrogatepass")
        if kind == "bom":
            data = b"\xef\xbb\xbf" + data
    suffix = draw(st.sampled_from([".json", ".jsonl", ".txt", "", ".JSON"]))
    fmt = draw(st.none() | st.sampled_from(FORMATS) | st.sampled_from(["CounterFact_ROME", "nope", ""]))
    return suffix, data, fmt


@FUZZ
@given(file=data_files(), limit=st.none() | st.integers(-1, 3))
def test_data_entry_point_raises_only_flearn_errors(fuzz_dir, file, limit):
    suffix, data, fmt = file
    path = fuzz_dir / f"data{suffix}"
    path.write_bytes(data)
    try:
        ds = load_dataset(path, fmt, limit=limit)
    except FlearnError as err:
        event("FlearnError")
        assert str(err)
        return
    event(f"loaded {ds.format}")
    assert ds.records and (limit is None or len(ds.records) <= limit)
