"""``flearn bench``'s configuration is as strict as ``flearn update``'s: finite floats, integers that are not
booleans, switches that are YAML ``true``/``false``; every problem of the file, the options and the
overrides reported at once as ``source:field: why``, exit 2, nothing written."""

from __future__ import annotations

import pytest

from config_checks import lax_values_refused
from flearning.cli import main
from flearning.config import (
    DATA_ENV,
    FULL_DATA,
    SAMPLE_DATA,
    BenchConfig,
    PrimeOptions,
    PrimeSettings,
    load_config,
)
from flearning.errors import ConfigError
from flearning.resources import sample_path


def problems(config, overrides=(), **kw) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(BenchConfig, config, list(overrides), **kw)
    assert info.value.exit_code == 2
    return str(info.value)


def test_wrong_types_are_refused_not_coerced_all_at_once(tmp_path):
    """pydantic's lax mode would take ``true`` as 1, ``"yes"`` as true and ``"1_0"`` as 10."""
    config = tmp_path / "bench.yaml"
    config.write_text(
        'n: true\nn_val: "1_0"\nseeds: [0, true]\ngeneration: "yes"\nfluency: 0\n'
        "lambda_grid: [0.1, false]\nprime:\n  max_epochs: true\n  batch_size: true\n"
    )
    assert problems(config, ["eval_batch_size=true", "trust_remote_code=1", "lambdas=[true]"]) == "\n".join(
        [
            "invalid configuration: 11 problems",
            f"  {config}:n: Input should be an integer, not a boolean",
            f"  {config}:n_val: Input should be an integer, got the text '1_0'",
            f"  {config}:seeds.1: Input should be an integer, not a boolean",
            f"  {config}:lambdas.0: Input should be a number, not a boolean",
            f"  {config}:lambda_grid.1: Input should be a number, not a boolean",
            f"  {config}:prime.max_epochs: Input should be a number, not a boolean",
            f"  {config}:prime.batch_size: Input should be an integer, not a boolean",
            f"  {config}:eval_batch_size: Input should be an integer, not a boolean",
            f"  {config}:generation: Input should be true or false, not 'yes'",
            f"  {config}:fluency: Input should be true or false, not 0",
            f"  {config}:trust_remote_code: Input should be true or false, not 1",
        ]
    )


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("linf_bound=.inf", "linf_bound"),
        ("linf_bound=1e400", "linf_bound"),
        ("locality_tolerance=.nan", "locality_tolerance"),
        ("prime.lr=-.inf", "prime.lr"),
        ("prime.max_epochs=1e400", "prime.max_epochs"),
        ("prime.threshold=.nan", "prime.threshold"),
        ("lambda_grid=[0.1, .inf]", "lambda_grid.1"),
        ("lambda_grid=[1e400]", "lambda_grid.0"),
        ("lambdas=[0.5, .nan]", "lambdas.1"),
        ("lambdas=[-1e400]", "lambdas.0"),
        ("full.lr=.inf", "full.lr"),
        ("lora.alpha=.inf", "lora.alpha"),
    ],
)
def test_non_finite_numbers_are_refused(override, field):
    assert problems(None, [override]) == (
        f"invalid configuration: 1 problem\n  command line:{field}: Input should be a finite number"
    )


def test_non_finite_numbers_in_a_file_are_refused_naming_file_and_field(tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text("linf_bound: .inf\nlocality_tolerance: 1e400\nlambda_grid: [0.1, .inf, 1e400]\n")
    assert problems(config) == "\n".join(
        [
            "invalid configuration: 4 problems",
            f"  {config}:lambda_grid.1: Input should be a finite number",
            f"  {config}:lambda_grid.2: Input should be a finite number",
            f"  {config}:locality_tolerance: Input should be a finite number",
            f"  {config}:linf_bound: Input should be a finite number",
        ]
    )


def test_yaml_numbers_without_a_dot_and_quoted_numbers_are_floats(tmp_path):
    """PyYAML reads ``5e-5`` (no dot) as a string, and ``"5e-5"`` is one too: both are the number 5e-5."""
    config = tmp_path / "bench.yaml"
    config.write_text(
        "linf_bound: 5e-5\nlocality_tolerance: '2.5'\nlambdas: ['5e-1', 1e-1]\nlambda_grid: [\"1E-1\", 3e-1]\n"
        'prime:\n  lr: "5e-5"\n  threshold: 9e-1\nfull:\n  lr: "1e-4"\nseeds: ["3"]\n'
    )
    cfg = load_config(BenchConfig, config, ['forget_full.lr="2e-4"'])
    assert cfg.linf_bound == 5e-5 and cfg.locality_tolerance == 2.5
    assert cfg.lambdas == [0.5, 0.1] and cfg.lambda_grid == [0.1, 0.3]
    assert cfg.prime.lr == 5e-5 and cfg.prime.threshold == 0.9 and cfg.seeds == [3]
    assert cfg.full.lr == 1e-4 and cfg.forget_full.lr == 2e-4
    floats = [cfg.linf_bound, cfg.locality_tolerance, *cfg.lambdas, *cfg.lambda_grid, cfg.prime.lr]
    assert all(type(v) is float for v in floats)


def test_switches_take_yaml_booleans(tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text("generation: false\nfluency: true\n")
    cfg = load_config(BenchConfig, config, ["trust_remote_code=false"])
    assert (cfg.generation, cfg.fluency, cfg.trust_remote_code) == (False, True, False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lambdas=x", "lambdas: Input should be 'auto' or a list of numbers, not 'x'"),
        ("lambdas=0.5", "lambdas: Input should be 'auto' or a list of numbers, not 0.5"),
        ("lambdas=[]", "lambdas: Input should be 'auto' or at least one λ"),
        ("lambdas=auto", "lambdas: auto needs a validation split (n_val >= 1)"),
        ("lambda_grid=[]", "lambda_grid: List should have at least 1 item after validation, not 0"),
        ("seeds=[]", "seeds: List should have at least 1 item after validation, not 0"),
        ("seeds=[-1]", "seeds.0: Input should be greater than or equal to 0"),
        ("seeds=[4294967296]", "seeds.0: Input should be less than 4294967296"),
        ("prime.threshold=1.5", "prime.threshold: Input should be less than or equal to 1"),
        ("linf_bound=0", "linf_bound: Input should be greater than 0"),
        ("lambda_choice=best", "lambda_choice: Input should be 'each_seed' or 'first_seed'"),
    ],
)
def test_lambdas_seeds_and_bounds(override, message):
    """Each problem is one line naming the field (a λ list is not reported once per member of a union);
    an empty λ grid or seed list (nothing to choose from, nothing to run) and seeds NumPy refuses too."""
    assert problems(None, [override]) == f"invalid configuration: 1 problem\n  command line:{message}"


def test_auto_lambda_with_a_validation_split_loads():
    cfg = load_config(BenchConfig, None, ["lambdas=auto", "n_val=2", "lambda_grid=[0.5, 1]"])
    assert cfg.lambdas == "auto" and cfg.lambda_grid == [0.5, 1.0]
    assert cfg.model_dump(mode="json")["lambdas"] == "auto"


def test_overrides_change_one_key_of_a_section_and_profiles_stay_underneath(tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text("prime:\n  lr: 1e-3\nn: 5\n")
    cfg = load_config(BenchConfig, config, ["prime.max_epochs=3"], {"n": 7}, profile="quick")
    assert (cfg.prime.lr, cfg.prime.max_epochs, cfg.n) == (1e-3, 3.0, 7)
    assert cfg.seeds == [0] and cfg.lambdas == [0.7]  # from the profile


@pytest.mark.parametrize("model", [BenchConfig, PrimeSettings, PrimeOptions])
def test_every_number_and_switch_refuses_what_lax_mode_would_coerce(model):
    """Every number field (list items included) refuses inf, NaN, 1e400, booleans and ``"1_0"``; every
    switch refuses 1, 0, ``"yes"``, ``"off"``. A field added later with a plain float/int/bool fails here."""
    checked = lax_values_refused(model)
    expected_fields = {
        BenchConfig: {"n", "n_val", "seeds", "lambdas", "lambda_grid", "locality_tolerance", "linf_bound"}
        | {"eval_batch_size", "generation", "fluency", "trust_remote_code", "allow_negative_lambda"},
        PrimeSettings: {"lr", "max_epochs", "threshold", "batch_size", "grad_accum", "fused_accumulation"},
        PrimeOptions: {"lr", "max_epochs", "threshold", "batch_size", "grad_accum", "fused_accumulation"}
        | {"seed"},
    }[model]
    assert set(checked) == expected_fields


def test_cli_reports_every_problem_at_once_and_writes_nothing(tmp_path, capsys):
    config = tmp_path / "bench.yaml"
    config.write_text("linf_bound: .inf\ngeneration: 'yes'\ncolour: red\n")
    out = tmp_path / "bench"
    code = main(
        ["bench", "--config", str(config), "--profile", "fast", "--out", str(out), "prime.lr=1e400", "n"]
    )
    assert code == 2
    assert capsys.readouterr().err == "\n".join(
        [
            "error: invalid configuration: 6 problems",
            "  command line:n: expected key=value",
            "  command line:--profile: unknown profile 'fast'; choose one of: quick, paper, paper-v2",
            f"  {config}:prime.lr: Input should be a finite number",
            f"  {config}:linf_bound: Input should be a finite number",
            f"  {config}:generation: Input should be true or false, not 'yes'",
            f"  {config}:colour: Extra inputs are not permitted",
            "",
        ]
    )
    assert not out.exists()


def test_lambda_choice_option_reaches_the_config(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--lambda", "auto", "--lambda-choice", "first_seed", "--out", str(out)])
    assert code == 2  # auto without --n-val: the option itself was taken (the one problem is n_val)
    assert capsys.readouterr().err == (
        "error: invalid configuration: 1 problem\n  command line:lambdas: auto needs a validation split (n_val >= 1)\n"
    )
    cfg = load_config(BenchConfig, None, [], {"lambda_choice": "first_seed", "lambdas": "auto", "n_val": 1})
    assert cfg.lambda_choice == "first_seed" and BenchConfig().lambda_choice == "each_seed"
    code = main(["bench", "--lambda-choice", "best", "--out", str(out)])
    assert (
        code == 2 and "lambda_choice: Input should be 'each_seed' or 'first_seed'" in capsys.readouterr().err
    )
    assert not out.exists()


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_lambda_option_exits_2(value, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--lambda", f"0.5,{value}", "--out", str(out)])
    assert code == 2
    assert capsys.readouterr().err == (
        "error: invalid configuration: 1 problem\n  command line:lambdas.1: Input should be a finite number\n"
    )
    assert not out.exists()


# ---- datasets: shipped samples, or the full datasets under a data root (never the source tree) -------


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """A data root ``shared/data`` holding both full datasets (copies of the samples), no $FLEARN_DATA."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    root = (tmp_path / "shared" / "data").resolve()
    for name, path in FULL_DATA.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(sample_path(SAMPLE_DATA[name]).read_bytes())
    return root


def full_files(root):
    return {name: root / path for name, path in FULL_DATA.items()}


def test_the_quick_profile_runs_on_the_shipped_samples(data_root):
    cfg = load_config(BenchConfig, None, [f"data_root={data_root}"], profile="quick")
    assert cfg.data == {
        "zsre": sample_path("zsre-200.json"),
        "counterfact": sample_path("counterfact-200.json"),
    }
    assert all(path.is_file() for path in cfg.data.values())


def test_the_paper_profile_reads_the_full_datasets_under_the_data_root(data_root, monkeypatch):
    assert load_config(BenchConfig, None, [], {"data_root": data_root}, profile="paper").data == full_files(
        data_root
    )
    monkeypatch.setenv(DATA_ENV, str(data_root))
    assert load_config(BenchConfig, None, [], profile="paper").data == full_files(data_root)
    monkeypatch.delenv(DATA_ENV)
    work = data_root.parent.parent / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)  # the default root: ../shared/data from the current directory
    assert load_config(BenchConfig, None, [], profile="paper").data == full_files(data_root)


def test_missing_full_datasets_name_the_file_and_how_to_set_the_root(data_root):
    (data_root / FULL_DATA["counterfact"]).unlink()
    assert problems(None, [f"data_root={data_root}"], profile="paper") == (
        "invalid configuration: 1 problem\n"
        f"  command line:data: the full datasets are not under the data root {data_root}: missing "
        f"{data_root / FULL_DATA['counterfact']}; set the data root (--data-root DIR, data_root=DIR or "
        "$FLEARN_DATA) or pass --data NAME=PATH"
    )


def test_without_a_profile_the_full_datasets_are_used_when_there_else_the_samples(data_root):
    assert load_config(BenchConfig, None, [f"data_root={data_root}"]).data == full_files(data_root)
    (data_root / FULL_DATA["zsre"]).unlink()
    assert load_config(BenchConfig, None, [f"data_root={data_root}"]).data == {
        name: sample_path(file) for name, file in SAMPLE_DATA.items()
    }


def test_given_datasets_replace_the_profile_s(data_root, tmp_path):
    facts = tmp_path / "facts.json"
    cfg = load_config(BenchConfig, None, [], {"data": {"toy": str(facts)}}, profile="paper")
    assert cfg.data == {"toy": facts}


def test_a_data_root_that_cannot_be_a_path_is_a_config_problem_not_a_crash(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    root = '"a\\0b"'  # YAML for a path with a NUL byte: no file can be there
    assert load_config(BenchConfig, None, [f"data_root={root}"]).data == {
        name: sample_path(file) for name, file in SAMPLE_DATA.items()
    }
    assert "command line:data: the full datasets are not under the data root" in problems(
        None, [f"data_root={root}"], profile="paper"
    )
