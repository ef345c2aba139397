"""``flearn update`` with a prompt template and a ZsRE file (issue #11): the template reaches both stages
and the evaluation, and run.json states it and where the old answers were read from."""

from __future__ import annotations

import json

from flearning.config import UpdateConfig
from flearning.recipes.update import update

FAST = {"learn": {"lr": 1e-2, "epochs": 1}, "forget": {"lr": 1e-2, "epochs": 1}, "eval_batch_size": 8}


def zsre_record(i: int) -> dict:
    return {
        "subject": f"Creek {i}",
        "src": f"Which river contains Creek {i}?",
        "pred": f"Pred {i}",
        "rephrase": f"What river is Creek {i} in?",
        "alt": f"New River {i}",
        "answers": [f"Gold River {i}"],
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "William Shakespeare",
    }


def test_update_with_alpaca_on_zsre_records(tiny_model_dir, tmp_path):
    data = tmp_path / "z.json"
    data.write_text(json.dumps([zsre_record(i) for i in range(4)]))
    out = tmp_path / "out"
    cfg = UpdateConfig(
        model=str(tiny_model_dir), data=data, method="flearning-ft", template="alpaca", out=out, **FAST
    )
    result = update(cfg, progress=False)
    run = json.loads((out / "run.json").read_text())
    assert run["template"] == "alpaca" and run["config"]["template"] == "alpaca"
    assert run["stages"]["forget"]["template"] == "alpaca" and run["stages"]["learn"]["template"] == "alpaca"
    assert run["data"]["old"]["zsre_old"] == "pred"  # every record has pred: the default reads it
    assert [r.target_old for r in result.records] == [f"Pred {i}" for i in range(4)]
    assert result.after.meta["template"] == "alpaca" and result.before.meta["template"] == "alpaca"
    assert "template=alpaca" in (out / "README.md").read_text()  # the model card's command


def test_prime_with_a_template_records_it(tiny_model_dir, tmp_path, capsys):
    from flearning.cli import main

    data = tmp_path / "z.json"
    data.write_text(json.dumps([zsre_record(i) for i in range(4)]))
    out = tmp_path / "primed"
    args = [
        "prime",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--max-epochs",
        "1",
    ]
    assert main([*args, "--template", "alpaca", "--zsre-old", "answers", "--no-progress"]) == 0
    info = json.loads((out / "prime.json").read_text())
    assert (info["template"], info["stage"]["template"], info["zsre_old"]) == ("alpaca", "alpaca", "answers")
    assert main([*args, "--template", "vicuna", "--overwrite"]) == 2
    assert "'vicuna' is not one of plain, alpaca, chat" in capsys.readouterr().err
