"""The seed as the unit of the bench's paired comparisons (issue #11): each seed's mean difference over
its records, and a Student-t 95 % interval over seeds, checked against a hand computation."""

from __future__ import annotations

import pytest

from flearning.evaluation.statistics import t_cdf, t_interval, t_quantile
from flearning.recipes.bench_cache import RunRecord
from flearning.recipes.bench_report import paired_comparisons, paired_table


@pytest.mark.parametrize(
    ("dof", "quantile"),
    # Student's t 0.975 quantiles as printed in statistical tables
    [(1, 12.7062047362), (2, 4.3026527297), (4, 2.7764451052), (10, 2.2281388520), (30, 2.0422724563)],
)
def test_t_quantile_matches_the_tables(dof, quantile):
    assert t_quantile(0.975, dof) == pytest.approx(quantile, abs=1e-8)
    assert t_cdf(quantile, dof) == pytest.approx(0.975, abs=1e-12)
    assert t_quantile(0.025, dof) == pytest.approx(-quantile, abs=1e-8)


def run(seed: int, method: str, reliability: list[float], lam: float | None = None) -> RunRecord:
    rows = [
        {"id": str(i), "reliability": v, "generality": None, "locality": None}
        for i, v in enumerate(reliability)
    ]
    return RunRecord("toy", seed, method, lam, "eval", rows)


# reliability per record: ft and flearning-ft (λ 0.7) on 4 records, 3 seeds
FT = {0: [1, 0, 1, 1], 1: [1, 1, 0, 1], 2: [0, 0, 1, 1]}
FL = {0: [1, 1, 1, 1], 1: [1, 1, 0, 1], 2: [1, 1, 1, 1]}


def test_seed_level_difference_by_hand():
    runs = [run(s, "ft", FT[s]) for s in FT] + [run(s, "flearning-ft", FL[s], 0.7) for s in FL]
    (p,) = paired_comparisons(runs)
    # per-record differences: seed 0 [0, 1, 0, 0], seed 1 [0, 0, 0, 0], seed 2 [1, 1, 0, 0]
    # records as the unit: 12 differences, mean 3/12 = 0.25, sample sd sqrt((3·0.75² + 9·0.25²)/11)
    # = sqrt(2.25/11) = 0.452267; half width 1.96 · 0.452267 / sqrt(12) = 0.255895
    assert (p["method"], p["lambda"], p["baseline"], p["metric"], p["n"]) == (
        "flearning-ft",
        0.7,
        "ft",
        "reliability",
        12,
    )
    assert p["diff"] == pytest.approx(25.0)
    assert p["ci95"] == pytest.approx([25.0 - 25.5895, 25.0 + 25.5895], abs=1e-3)
    # the seed as the unit: seed means ×100 are 25, 0, 50; their mean 25, sample sd 25, standard error
    # 25 / sqrt(3) = 14.433757; t(0.975, 2 dof) = 4.302653; half width 62.103443
    assert p["n_seeds"] == 3 and p["seed_dof"] == 2
    assert p["seed_diffs"] == {"0": 25.0, "1": 0.0, "2": 50.0}
    assert p["seed_diff"] == pytest.approx(25.0)
    assert p["seed_ci95"] == pytest.approx([25.0 - 62.103443, 25.0 + 62.103443], abs=1e-5)
    assert "seed_note" not in p
    table = paired_table("toy", [p])
    assert (
        "| flearning-ft (λ=0.7) vs ft | reliability | 12 | +25.0 | [-0.6, +50.6] | 3 | +25.0 | [-37.1, +87.1] |"
        in table
    )


def test_one_seed_has_no_interval_over_seeds():
    (p,) = paired_comparisons([run(0, "ft", FT[0]), run(0, "flearning-ft", FL[0], 0.7)])
    assert (p["n_seeds"], p["seed_diffs"], p["seed_diff"], p["seed_ci95"]) == (1, {"0": 25.0}, 25.0, None)
    assert p["seed_note"].startswith("one seed: no interval over seeds")
    assert "| 1 | +25.0 | one seed: none |" in paired_table("toy", [p])


def test_t_interval_of_two_values():
    # mean 2, sd sqrt(2), se 1, t(0.975, 1) = 12.706205
    mean, low, high = t_interval([1.0, 3.0])
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - 12.706205, 2.0 + 12.706205), abs=1e-6)


def test_lora_forgetting_then_full_learning_is_paired_with_both_baselines():
    """flearning-lora-ft against plain fine-tuning (the effect map's comparison) and against full-FT
    forgetting (which subtraction is better), each on the same records."""
    lora_ft = [0, 1, 1, 1]
    runs = [
        run(0, "ft", FT[0]),
        run(0, "flearning-ft", FL[0], 0.3),
        run(0, "flearning-lora-ft", lora_ft, 3.0),
    ]
    pairs = {(p["method"], p["baseline"]): p for p in paired_comparisons(runs)}
    assert set(pairs) == {
        ("flearning-ft", "ft"),
        ("flearning-lora-ft", "ft"),
        ("flearning-lora-ft", "flearning-ft"),
    }
    assert pairs[("flearning-lora-ft", "ft")]["diff"] == pytest.approx(100 * (-1 + 1 + 0 + 0) / 4)
    assert pairs[("flearning-lora-ft", "flearning-ft")]["diff"] == pytest.approx(100 * (-1 + 0 + 0 + 0) / 4)
    assert pairs[("flearning-lora-ft", "ft")]["baseline_lambda"] is None
    assert pairs[("flearning-lora-ft", "flearning-ft")]["baseline_lambda"] == 0.3
