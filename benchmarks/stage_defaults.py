"""How well each learning-stage setting teaches new facts to the embedded SmolLM2-135M: the measurement
behind the default learning rates and epochs (README "Defaults and why").

48 CounterFact val facts, learning target_new from the unprimed model; teacher-forced accuracy of the
new and the old answer afterwards.

    .venv/bin/python benchmarks/stage_defaults.py [--n 48]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48)
    args = parser.parse_args()

    from flearning.data import load_records
    from flearning.evaluation.evaluate import teacher_forced_accuracy
    from flearning.models import load_model
    from flearning.resources import sample_path
    from flearning.training import LoraSettings, TrainConfig, train

    records = load_records(sample_path("counterfact-200.json"), limit=args.n)
    new = [(r.prompt, r.target_new) for r in records]
    old = [(r.prompt, r.target_old) for r in records]
    model, tokenizer = load_model()

    def acc(m, pairs) -> float:
        scores = teacher_forced_accuracy(m, tokenizer, pairs)
        return sum(scores) / len(scores)

    settings = {
        "full lr 5e-5 x3": TrainConfig(lr=5e-5, epochs=3),
        "full lr 1e-4 x3": TrainConfig(lr=1e-4, epochs=3),
        "lora lr 5e-4 x3": TrainConfig(lr=5e-4, epochs=3, lora=LoraSettings()),
        "lora lr 1e-3 x5": TrainConfig(lr=1e-3, epochs=5, lora=LoraSettings()),
        "lora lr 2e-3 x5": TrainConfig(lr=2e-3, epochs=5, lora=LoraSettings()),
    }
    rows = {"before": {"new_acc": acc(model, new), "old_acc": acc(model, old)}}
    for name, cfg in settings.items():
        start = time.perf_counter()
        result = train(copy.deepcopy(model), tokenizer, new, cfg, progress=False)
        rows[name] = {
            "new_acc": acc(result.model, new),
            "old_acc": acc(result.model, old),
            "final_loss": result.losses[-1],
            "steps": result.steps,
            "seconds": time.perf_counter() - start,
        }
    path = write_json("stage_defaults.json", {"n": len(records), "rows": rows, "machine": machine()})
    print(f"{'setting':18} {'new acc':>8} {'old acc':>8} {'loss':>7} {'s':>6}")
    for name, row in rows.items():
        print(
            f"{name:18} {row['new_acc']:8.3f} {row['old_acc']:8.3f} {row.get('final_loss', 0):7.3f} "
            f"{row.get('seconds', 0):6.1f}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
