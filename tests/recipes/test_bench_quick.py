"""The quick bench profile end to end on the embedded SmolLM2-135M, every method and metric reported,
shrunk by overrides to 4 edits and one-epoch stages (the whole profile took 4 to 9 minutes, most of the
slow tests' time; what is checked does not depend on the scale)."""

from __future__ import annotations

import json

import pytest

from flearning.cli import main
from flearning.evaluation import METRICS
from flearning.methods import FINE_TUNING
from flearning.resources import sample_path

pytestmark = pytest.mark.slow

N = 4


def test_quick_profile_reports_every_method_and_metric(tmp_path):
    out = tmp_path / "bench-quick"
    code = main(
        [
            "bench",
            "--profile",
            "quick",
            "--out",
            str(out),
            "--no-progress",
            "--data",
            f"zsre={sample_path('zsre-200.json')}",
            "--data",
            f"counterfact={sample_path('counterfact-200.json')}",
            "--n",
            str(N),
            "prime.max_epochs=3",
            "full.epochs=1",
            "lora_stage.epochs=1",
            "forget_full.epochs=1",
            "forget_lora.epochs=1",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for dataset in ("zsre", "counterfact"):
        methods = summary["datasets"][dataset]["methods"]
        labels = {m.split(" (λ")[0] for m in methods}
        assert labels == {"primed (θ)", *FINE_TUNING}  # the quick profile: the methods that fine-tune
        for name, metrics in methods.items():
            for metric in METRICS:
                if metric in ("portability", "fluency", "fluency_sampled"):
                    continue  # no portability probes in these files; fluency is off in the quick profile
                assert metrics[metric]["n"] == N, (dataset, name, metric)
                assert 0.0 <= metrics[metric]["mean"] <= 100.0
        prime = summary["datasets"][dataset]["prime"][0]
        assert prime["accuracy"] > prime["accuracy_before"]
        assert methods["primed (θ)"]["locality"]["mean"] == 100.0
