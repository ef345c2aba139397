"""Output safety, across every command that writes (issue 16, findings 1, 2, 7, 8 and 10).

The rule (``flearning.io.output``): no command writes over or deletes an input it was given; without
``--overwrite`` no existing file is replaced; ``--overwrite`` replaces only an earlier output of the same
command (its ``.flearn-output.json`` marker says so), never one that holds, is or lies inside an input,
never the home, root or current directory, never a symlink's target. A run holds a lock on its output
for its whole length (a second run exits 2 naming the first's pid), and removes what killed runs of the
same output left behind; ``flearn clean`` lists and removes such leftovers.

Every refusal is checked by value: exit code 2, the reason in the message, and the sha256 of every file
of the test's tree unchanged. The fuzz test at the end draws random layouts of inputs, user files,
earlier outputs and symlinks, and checks that no file outside the output ever changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import pytest
from reliability_helpers import bench_args, update_args

from flearning.cli import main
from flearning.errors import FlearnError
from flearning.recipes.work_dir import work_dir_for
from tiny import tiny_llama

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks and signals")

MARKER = ".flearn-output.json"
REPORT_FILES = {"records.jsonl", "summary.json", "summary.md", "summary.csv", "metrics.png"}
# the commands that replace their output directory as a whole (eval and bench write inside theirs)
WHOLE = ["update", "prime", "vector compute", "vector apply", "vector scale"]
ALL = [*WHOLE, "eval", "bench"]
LABEL = {
    "update": "flearn update",
    "prime": "flearn prime",
    "vector compute": "flearn vector compute/scale",
    "vector scale": "flearn vector compute/scale",
    "vector apply": "flearn vector apply",
    "eval": "flearn eval",
    "bench": "flearn bench",
}
KIND = {
    "update": "update",
    "prime": "prime",
    "vector compute": "vector",
    "vector scale": "vector",
    "vector apply": "vector-apply",
    "eval": "eval",
    "bench": "bench",
}


# ---- helpers ---------------------------------------------------------------------------------------------


def run(args, capsys) -> tuple[int, str]:
    """(exit code, stdout + stderr) of ``flearn ARGS`` in this process; an exception escaping ``main`` is
    what a user would see as a traceback, so it is returned as exit 1 with the traceback."""
    try:
        code, tb = main([str(a) for a in args]), ""
    except Exception:
        code, tb = 1, traceback.format_exc()
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err + tb).split())  # rich wraps long lines


def hashes(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (symlinks not followed): relative path → sha256 of a file, the target of
    a symlink, or "dir"."""
    found = {}
    for parent, dirs, files in os.walk(root):  # does not follow symlinks to directories
        for name in [*dirs, *files]:
            path = Path(parent) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def command(name: str, inputs: dict[str, Path], out, *extra: str, **given: Path) -> list[str]:
    """``flearn NAME`` writing ``out``, on the tiny inputs (``given`` replaces some: data=..., model=...)."""
    i = {**inputs, **given}
    m, facts, vec, tuned = str(i["model"]), str(i["facts"]), str(i["vector"]), str(i["tuned"])
    args = {
        "update": update_args(i["model"], i["facts"], out, "ft"),
        "prime": ["prime", "--model", m, "--data", facts, "--out", out, "--max-epochs", "1", "--no-progress"],
        "eval": ["eval", "--model", m, "--data", facts, "--out", out, "--no-generation", "--no-progress"],
        "bench": bench_args(i["model"], i["facts"], out, "ft"),
        "vector compute": ["vector", "compute", "--base", m, "--finetuned", tuned, "--out", out],
        "vector apply": ["vector", "apply", "--model", m, "--vector", vec, "--lambda", "0.5", "--out", out],
        "vector scale": ["vector", "scale", vec, "--by", "2", "--out", out],
    }[name]
    return [str(a) for a in [*args, *extra]]


@pytest.fixture
def inputs(tmp_path, tiny_model_dir, tokenizer, facts):
    """A tiny model, a fine-tuned copy (another seed), the vector between them, the facts: all in
    ``tmp_path``."""
    tuned = tmp_path / "tuned"
    tiny_llama(1).save_pretrained(tuned)
    tokenizer.save_pretrained(tuned)
    vector = tmp_path / "vector"
    assert (
        main(
            [
                "vector",
                "compute",
                "--base",
                str(tiny_model_dir),
                "--finetuned",
                str(tuned),
                "--out",
                str(vector),
            ]
        )
        == 0
    )
    return {"model": tiny_model_dir, "tuned": tuned, "vector": vector, "facts": facts}


def earlier_output(name: str, inputs, out: Path, capsys) -> Path:
    """``out`` written by ``flearn NAME`` (an earlier output of that command)."""
    code, text = run(command(name, inputs, out), capsys)
    assert code == 0, text
    return out


def assert_refused(code: int, text: str, *reasons: str) -> None:
    assert "Traceback" not in text, text
    assert code == 2, text
    for reason in reasons:
        assert reason in text, text


# ---- finding 1: no command replaces an input, or a user's file without --overwrite ----------------------


def test_eval_never_replaces_its_own_data_file(inputs, tmp_path, capsys):
    """The reproduction: ``flearn eval --data q/records.jsonl --out q`` replaced the dataset by metrics."""
    q = tmp_path / "q"
    q.mkdir()
    data = Path(shutil.copy(inputs["facts"], q / "records.jsonl"))
    before = hashes(tmp_path)
    for extra in ([], ["--overwrite"]):
        code, text = run(command("eval", inputs, q, *extra, facts=data), capsys)
        assert_refused(code, text, f"{q}: holds the input data {data}")
        assert hashes(tmp_path) == before


@pytest.mark.parametrize("name", ALL)
def test_no_command_replaces_a_users_files_without_overwrite(name, inputs, tmp_path, capsys):
    """A directory of the user's, holding files named like the command's own: refused, nothing changes."""
    mine = tmp_path / "mine"
    mine.mkdir()
    for file in ("model.safetensors", "config.json", "vector.json", "summary.json", "records.jsonl"):
        (mine / file).write_text(f"the user's {file}")
    before = hashes(tmp_path)
    code, text = run(command(name, inputs, mine), capsys)
    if name in ("eval", "bench"):  # written inside: the files it would replace are named
        assert_refused(code, text, "summary.json", f"which flearn {name} would replace")
    else:
        assert_refused(code, text, "not empty", "--overwrite")
    assert hashes(tmp_path) == before


def test_eval_replaces_its_own_earlier_report_only_with_overwrite(inputs, tmp_path, capsys):
    report = earlier_output("eval", inputs, tmp_path / "report", capsys)
    notes = report / "notes.txt"
    notes.write_text("mine")
    before = hashes(tmp_path)
    code, text = run(command("eval", inputs, report, "--name", "again"), capsys)
    assert_refused(
        code, text, "holds the output of an earlier flearn eval (metrics.png, records.jsonl", "--overwrite"
    )
    assert hashes(tmp_path) == before
    code, text = run(command("eval", inputs, report, "--name", "again", "--overwrite"), capsys)
    assert code == 0, text
    assert "again" in json.loads((report / "summary.json").read_text())["methods"]
    assert notes.read_text() == "mine"  # only the report's files were replaced


def test_a_bench_directory_is_continued_by_its_rerun(inputs, tmp_path, capsys):
    """The bench keeps its cache in its directory: the same command again continues there (no
    --overwrite); the user's files in it are left alone."""
    bench = earlier_output("bench", inputs, tmp_path / "bench", capsys)
    assert json.loads((bench / MARKER).read_text())["kind"] == "bench"
    (bench / "notes.txt").write_text("mine")
    code, text = run(command("bench", inputs, bench), capsys)
    assert code == 0, text
    assert json.loads((bench / "summary.json").read_text())["counters"]["cached_runs"] == 1
    assert (bench / "notes.txt").read_text() == "mine"


# ---- finding 2: --overwrite replaces only an earlier output of the same command ------------------------


OVERWRITABLE = [*WHOLE, "eval"]  # the bench has no --overwrite: it continues its own directory


@pytest.mark.parametrize("name", OVERWRITABLE)
def test_overwrite_replaces_only_an_earlier_output_of_the_same_command(name, inputs, tmp_path, capsys):
    # a directory of the user's
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "summary.json").write_text("mine too")
    # an earlier output of another command
    other_name = "vector apply" if KIND[name] == "vector" else "vector scale"
    other = earlier_output(other_name, inputs, tmp_path / "other", capsys)
    before = hashes(tmp_path)
    for out, reason in ((mine, "not an flearn output"), (other, f"the output of {LABEL[other_name]}")):
        code, text = run(command(name, inputs, out, "--overwrite"), capsys)
        if name == "eval" and out == other:  # eval writes inside: another command's directory is refused
            assert_refused(code, text, f"is the output of {LABEL[other_name]}")
        elif name == "eval":
            assert_refused(code, text, "which flearn eval would replace")
        else:
            assert_refused(
                code, text, f"--overwrite replaces only an earlier output of {LABEL[name]}", reason
            )
        assert hashes(tmp_path) == before
    # an earlier output of the same command is replaced
    same = earlier_output(name, inputs, tmp_path / "same", capsys)
    inode = same.stat().st_ino
    code, text = run(command(name, inputs, same, "--overwrite"), capsys)
    assert code == 0, text
    if name != "eval":  # replaced as a whole: a new directory (eval replaces the report's files in it)
        assert same.stat().st_ino != inode
    if KIND[name] == "vector":  # a knowledge vector describes itself in vector.json
        assert json.loads((same / "vector.json").read_text())["format"] == "flearning.knowledge_vector"
    else:
        assert json.loads((same / MARKER).read_text())["kind"] == KIND[name]


INPUT_INSIDE = {  # command → (the input moved into an earlier output, its option, how it is named)
    "update": ("facts", "data", "data"),
    "prime": ("facts", "data", "data"),
    "eval": ("facts", "data", "data"),
    "vector compute": ("tuned", "tuned", "fine-tuned model"),
    "vector apply": ("vector", "vector", "vector"),
    "vector scale": ("vector", "vector", "vector"),
}


@pytest.mark.parametrize("name", OVERWRITABLE)
def test_overwrite_never_deletes_an_input_inside_the_output(name, inputs, tmp_path, capsys):
    """``update --data outp/facts.jsonl --out outp --overwrite`` deleted facts.jsonl; ``vector apply
    --vector vout/kv --out vout --overwrite`` the vector."""
    key, option, what = INPUT_INSIDE[name]
    out = earlier_output(name, inputs, tmp_path / "outp", capsys)
    source = inputs[key]
    moved = out / source.name
    if source.is_dir():
        shutil.copytree(source, moved)
    else:
        shutil.copy(source, moved)
    before = hashes(tmp_path)
    code, text = run(command(name, inputs, out, "--overwrite", **{key: moved}), capsys)
    assert_refused(code, text, f"{out}: holds the input {what} {moved}")
    assert hashes(tmp_path) == before


def test_update_overwrite_never_deletes_its_config_file_inside_the_output(inputs, tmp_path, capsys):
    """``update --config outp/cfg.yaml --out outp --overwrite``: the config file is an input too."""
    out = earlier_output("update", inputs, tmp_path / "outp", capsys)
    config = out / "cfg.yaml"
    config.write_text(f"model: {inputs['model']}\ndata: {inputs['facts']}\nmethod: ft\nevaluate: false\n")
    digest = hashlib.sha256(config.read_bytes()).hexdigest()
    before = hashes(tmp_path)
    args = ["update", "--config", config, "--out", out, "--overwrite", "--no-progress"]
    code, text = run([*args, "learn.epochs=1"], capsys)
    assert_refused(code, text, f"{out}: holds the input config {config}")
    assert hashlib.sha256(config.read_bytes()).hexdigest() == digest
    assert hashes(tmp_path) == before


@pytest.mark.parametrize("name", ALL)
def test_home_and_current_directory_are_never_outputs(name, inputs, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    before = hashes(tmp_path)
    extra = [] if name == "bench" else ["--overwrite"]
    code, text = run(command(name, inputs, "~", *extra), capsys)
    assert_refused(code, text, f"{home}: is your home directory")
    assert hashes(tmp_path) == before
    if name in WHOLE:  # eval and bench write inside their directory: the current one is fine for them
        work = tmp_path / "work"
        (work / "sub").mkdir(parents=True)
        monkeypatch.chdir(work / "sub")
        before = hashes(tmp_path)
        for out in (".", ".."):
            code, text = run(command(name, inputs, out, "--overwrite"), capsys)
            assert_refused(code, text, "is the current directory (or holds it)")
        assert hashes(tmp_path) == before


def test_the_root_directory_is_never_an_output():
    from flearning.io.output import check_output

    for whole in (True, False):
        with pytest.raises(FlearnError, match="is the root directory"):
            check_output(Path("/"), kind="eval", inputs={}, overwrite=True, whole=whole)


@pytest.mark.parametrize("name", WHOLE)
def test_a_symlinked_out_is_refused_and_its_target_kept(name, inputs, tmp_path, capsys):
    target = earlier_output(name, inputs, tmp_path / "target", capsys)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    before = hashes(tmp_path)
    code, text = run(command(name, inputs, link, "--overwrite"), capsys)
    assert_refused(code, text, f"{link}: is a symbolic link (to {target})")
    assert hashes(tmp_path) == before and link.is_symlink()


# ---- finding 10: an output inside an input, the Python API's hint ----------------------------------------

INSIDE = {
    "update": "model",
    "prime": "model",
    "eval": "model",
    "vector apply": "model",
    "vector compute": "model",
    "vector scale": "vector",
}


@pytest.mark.parametrize("name", list(INSIDE))
def test_an_output_inside_an_input_is_refused(name, inputs, tmp_path, capsys):
    """``update --out MODEL/sub`` was allowed while ``eval`` refused it."""
    key = INSIDE[name]
    out = inputs[key] / "sub"
    before = hashes(tmp_path)
    code, text = run(command(name, inputs, out, "--overwrite"), capsys)
    what = {"model": "model" if name != "vector compute" else "base model", "vector": "vector"}[key]
    assert_refused(
        code, text, f"refusing to write into the input {what}'s directory ({inputs[key].resolve()})"
    )
    assert hashes(tmp_path) == before


def test_the_python_api_names_its_own_argument(inputs, tmp_path):
    from flearning.config import UpdateConfig
    from flearning.recipes.update import update
    from flearning.vectors import KnowledgeVector

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    with pytest.raises(FlearnError, match=r"overwrite=True"):
        update(UpdateConfig(model=str(inputs["model"]), data=inputs["facts"], out=busy, evaluate=False))
    with pytest.raises(FlearnError, match=r"overwrite=True"):
        KnowledgeVector.load(inputs["vector"]).save(busy)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]


# ---- finding 7: what killed runs leave behind ----------------------------------------------------------

# ``flearn update`` killed (os._exit, as by SIGKILL) while it writes its final output: after the model,
# while writing the model card into the temporary directory.
KILL_IN_SAVE = textwrap.dedent("""
    import os, sys
    import flearning.recipes.update as recipe
    from flearning.cli import main
    recipe.model_card = lambda summary: os._exit(9)
    sys.exit(main(sys.argv[1:]))
""")


def flearn_process(script: str, *args, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(log, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)], stdout=subprocess.DEVNULL, stderr=stderr, env=env
        )


def temporaries(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((f".{name}.tmp-", f".{name}.old-")))


def test_a_kill_during_the_final_save_leaves_a_temporary_that_the_rerun_removes(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    args = command("update", inputs, out)
    process = flearn_process(KILL_IN_SAVE, *args, log=tmp_path / "stderr.txt")
    assert process.wait(timeout=300) == 9, (tmp_path / "stderr.txt").read_text()
    [left] = temporaries(tmp_path, "out")  # the reproduction: the half-saved output, hidden
    assert (tmp_path / left / "model.safetensors").is_file() and not out.exists()
    code, text = run(args, capsys)
    assert code == 0, text
    assert temporaries(tmp_path, "out") == []
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def fake_temporaries(parent: Path, name: str) -> dict[str, Path]:
    """What killed writes of ``parent/name`` leave (a half-written output), and look-alikes of others."""
    made = {
        "stale": parent / f".{name}.tmp-k1lled00",
        "other output's": parent / f".{name}x.tmp-k1lled00",
        "another name's": parent / ".other.tmp-k1lled00",
        "not ours": parent / f".{name}.tmp-notours",  # not the 8 characters of mkdtemp
    }
    for path in made.values():
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"\0" * 1000)
    return made


@pytest.mark.parametrize("name", ALL)
def test_stale_temporaries_of_the_output_are_removed_by_the_next_run(name, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    made = fake_temporaries(tmp_path, "out")
    code, text = run(command(name, inputs, out), capsys)
    assert code == 0, text
    assert not made.pop("stale").exists()
    assert all(path.is_dir() for path in made.values())  # only the output's own


def test_the_bench_removes_stale_temporaries_of_its_cache(inputs, tmp_path, capsys):
    bench = earlier_output("bench", inputs, tmp_path / "bench", capsys)
    [primed] = (bench / "cache" / "prime").iterdir()
    stale = bench / "cache" / "prime" / f".{primed.name}x.tmp-k1lled00"  # a killed save of another entry
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    code, text = run(command("bench", inputs, bench), capsys)
    assert code == 0, text
    assert not stale.exists() and primed.is_dir()


def test_an_earlier_output_moved_aside_by_a_killed_replacement_is_put_back(inputs, tmp_path, capsys):
    """Killed between the two renames of a replacement, the previous output waits in ``.OUT.old-…``: the
    next run puts it back (and, as it is an earlier output, needs --overwrite to replace it)."""
    out = earlier_output("vector scale", inputs, tmp_path / "out", capsys)
    previous = hashes(out)
    holder = tmp_path / ".out.old-k1lled00"
    holder.mkdir()
    out.rename(holder / "previous")
    code, text = run(command("vector scale", inputs, out), capsys)
    assert_refused(code, text, "not empty", "--overwrite")
    assert hashes(out) == previous and not holder.exists()
    # and the leftover holder of a replacement that did finish is removed
    holder.mkdir()
    (holder / "previous").mkdir()
    code, text = run(command("vector scale", inputs, out, "--overwrite"), capsys)
    assert code == 0, text
    assert not holder.exists()


# A process holding the lock of an output, as a running flearn command does, until its stdin closes.
HOLD_LOCK = textwrap.dedent("""
    import sys
    from flearning.io.output import output_lock
    lock = output_lock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.read()
    lock.release()
""")


class Holder:
    """Another process holding ``out``'s lock (``with Holder(out) as pid``)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __enter__(self) -> int:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(self.out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert self.process.stdout.readline().strip() == "locked"
        return self.process.pid

    def __exit__(self, *exc) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def test_flearn_clean_lists_and_removes_what_killed_runs_left(inputs, tmp_path, capsys):
    runs = tmp_path / "runs"
    stale, nested, not_ours = (
        runs / ".a.tmp-k1lled00",
        runs / "sub" / ".e.tmp-k1lled00",
        runs / ".a.tmp-notours",
    )
    for path in (stale, nested, not_ours):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"\0" * 1000)
    restored = runs / ".b.old-k1lled00" / "previous"  # b is missing: its previous output is put back
    restored.mkdir(parents=True)
    (restored / "config.json").write_text("b's")
    finished = runs / ".c.old-k1lled00" / "previous"  # c is in place: the old one is removed
    finished.mkdir(parents=True)
    (runs / "c").mkdir()
    live = runs / ".d.tmp-l1ve0000"  # written by a running command
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"\0" * 10)
    (runs / ".notes").write_text("mine")
    with Holder(runs / "d") as pid:
        before = hashes(tmp_path)
        code, text = run(["clean", runs, "--dry-run"], capsys)
        assert code == 0, text
        assert hashes(tmp_path) == before
        assert f"would remove {stale} (1.0 kB" in text and f"would remove {nested}" in text
        assert f"would put back {restored} as {runs / 'b'}" in text
        assert f"would remove {finished.parent}" in text
        assert f"keeping {live}: {runs / 'd'} is being written by pid {pid}" in text
        code, text = run(["clean", runs], capsys)
        assert code == 0, text
        assert f"removed {stale}" in text
    assert not stale.exists() and not nested.exists() and not finished.parent.exists()
    assert (runs / "b" / "config.json").read_text() == "b's" and not restored.parent.exists()
    assert live.is_dir() and (runs / ".notes").read_text() == "mine"
    assert (runs / ".a.tmp-notours").is_dir()  # not a name mkdtemp makes


# ---- finding 8: two runs with the same output ----------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_a_second_run_on_the_same_output_exits_2_at_once(name, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    if name == "update":  # the first run's finished stages
        (work_dir_for(out) / "learn").mkdir(parents=True)
        (work_dir_for(out) / "identity.json").write_text("{}")
    live = tmp_path / ".out.tmp-l1ve0000"  # and the output it is writing
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"\0" * 10)
    before = hashes(tmp_path)
    with Holder(out) as pid:
        start = time.monotonic()
        code, text = run(command(name, inputs, out), capsys)
        seconds = time.monotonic() - start
    assert_refused(code, text, f"{out}: another flearn run (pid {pid}", "is writing this output")
    assert seconds < 20  # at once: before any model is loaded or trained
    assert hashes(tmp_path) == before


# ``flearn update`` standing still once its work directory ``OUT.partial`` is open (as a long training
# would), until a file appears.
PAUSE_WHILE_TRAINING = textwrap.dedent("""
    import os, sys, time
    import flearning.recipes.update as recipe
    from flearning.cli import main
    paused, go = sys.argv[1], sys.argv[2]
    real = recipe.open_work_dir
    def open_work_dir(*a, **kw):
        work = real(*a, **kw)
        open(paused, "w").close()
        while not os.path.exists(go):
            time.sleep(0.05)
        return work
    recipe.open_work_dir = open_work_dir
    sys.exit(main(sys.argv[3:]))
""")


def test_two_updates_with_the_same_out_do_not_destroy_each_other(inputs, tmp_path, capsys):
    """The second run discarded the first's live ``OUT.partial``, and both crashed."""
    out = tmp_path / "out"
    args = command("update", inputs, out)
    paused, go, log = tmp_path / "paused", tmp_path / "go", tmp_path / "stderr.txt"
    first = flearn_process(PAUSE_WHILE_TRAINING, paused, go, *args, log=log)
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        partial = hashes(work_dir_for(out))
        code, text = run(args, capsys)
        assert_refused(code, text, f"another flearn run (pid {first.pid}")
        assert hashes(work_dir_for(out)) == partial and not out.exists()
        go.touch()
        assert first.wait(timeout=120) == 0, log.read_text()
    finally:
        if first.poll() is None:
            first.kill()
    assert (out / "model.safetensors").is_file() and not work_dir_for(out).exists()
    assert temporaries(tmp_path, "out") == [] and not (tmp_path / ".out.lock").exists()


# ---- the fuzz test: random layouts, the invariant ----------------------------------------------------------

FUZZ_CASES = 50
FUZZ_COMMANDS = ["vector scale", "vector apply", "vector compute", "eval", "eval", "prime"]
READS = {
    "vector scale": ["vector"],
    "vector apply": ["model", "vector"],
    "vector compute": ["model", "tuned"],
    "eval": ["model", "facts"],
    "prime": ["model", "facts"],
}


def _place(rng: random.Random, root: Path, places: list[Path], source: Path, name: str) -> Path:
    target = rng.choice(places) / name
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy(source, target)
    return target


def _fake_output(path: Path, kind: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(json.dumps({"format": "flearn-output", "kind": kind}))
    (path / "summary.json").write_text(f"an earlier {kind} output")


def _fuzz_case(rng: random.Random, root: Path, inputs, monkeypatch):
    """A random tree: inputs, user files, earlier outputs (real and marked by hand), a symlink; a command,
    an --out among those places and new ones, --overwrite or not."""
    dirs = [root, root / "a", root / "a" / "b", root / "c", root / "home", root / "cwd"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.chdir(root / "cwd")
    placed = {
        "model": _place(rng, root, dirs, inputs["model"], "m"),
        "tuned": _place(rng, root, dirs, inputs["tuned"], "t"),
        "vector": _place(rng, root, dirs, inputs["vector"], "v"),
        "facts": _place(rng, root, dirs, inputs["facts"], rng.choice(["facts.jsonl", "records.jsonl"])),
    }
    for k in range(rng.randrange(4)):
        name = rng.choice(["notes.txt", "summary.json", "config.json", "model.safetensors", "vector.json"])
        (rng.choice(dirs) / name).write_text(f"the user's file {k}")
    for k in range(rng.randrange(3)):
        kind = rng.choice(["update", "prime", "vector-apply", "eval", "bench"])
        _fake_output(rng.choice(dirs) / f"earlier{k}", kind)
    candidates = [*dirs, *(d / "new" for d in dirs), root / "a" / "new" / "deeper", *placed.values()]
    candidates += [placed["model"] / "sub", placed["vector"] / "sub", placed["facts"].parent]
    candidates += [p for p in root.rglob("earlier*") if p.is_dir()]
    if rng.random() < 0.3:
        link = root / "link"
        link.symlink_to(
            rng.choice([*dirs[1:], *[p for p in root.rglob("earlier*")]]), target_is_directory=True
        )
        candidates.append(link)
    name = rng.choice(FUZZ_COMMANDS)
    out = rng.choice([*candidates, "~", "."])
    extra = ["--overwrite"] if rng.random() < 0.6 else []
    return name, placed, out, extra


def _may_change(name: str, target: Path, existed: bool, code: int) -> tuple[set[Path], set[Path]]:
    """(directories whose every file the command may have written, single files it may have written):
    nothing when it failed; else its output directory, or for eval into an existing directory the
    report's files and the marker inside it."""
    if code != 0:
        return set(), set()
    if name == "eval" and existed:
        return set(), {target / f for f in (*REPORT_FILES, MARKER)}
    return {target}, set()


def _free(path: Path, trees: set[Path], files: set[Path]) -> bool:
    """Whether the entry ``path`` (itself, not what a symlink points to) may have changed."""
    path = path.parent.resolve() / path.name
    return path in files or any(path == t or t in path.parents for t in trees)


def test_fuzz_no_file_outside_the_output_ever_changes(inputs, tmp_path_factory, capsys, monkeypatch):
    rng = random.Random(16)
    outcomes = {0: 0, 2: 0}
    started = time.monotonic()
    for case in range(FUZZ_CASES):
        root = tmp_path_factory.mktemp(f"fuzz{case}")
        with monkeypatch.context() as mp:
            name, placed, out, extra = _fuzz_case(rng, root, inputs, mp)
            target = Path(os.path.expanduser(str(out))).resolve()
            existed = target.is_dir() and any(target.iterdir())
            kind_before = (
                json.loads((target / MARKER).read_text())["kind"] if (target / MARKER).is_file() else None
            )
            before = hashes(root)
            read = {placed[key] for key in READS[name]}  # the command's inputs (the others are just files)
            input_files = {p: hashes(p) if p.is_dir() else p.read_bytes() for p in read}
            code, text = run(command(name, inputs, out, *extra, **placed), capsys)
        about = f"case {case}: flearn {name} --out {out} {extra}: exit {code}: {text[-400:]}"
        assert code in (0, 2), about
        outcomes[code] += 1
        trees, files = _may_change(name, target, existed, code)
        after = hashes(root)

        changed = sorted(
            rel
            for rel in before.keys() | after.keys()
            if before.get(rel) != after.get(rel) and not _free(root / rel, trees, files)
        )
        assert changed == [], f"{about}: changed outside the output: {changed}"
        for path, content in input_files.items():  # inputs are never touched, wherever they are
            assert (hashes(path) if path.is_dir() else path.read_bytes()) == content, about
        if code == 0 and name != "eval":  # replaced whole: only an earlier output of its own, and asked to
            assert not existed or (extra == ["--overwrite"] and kind_before == KIND[name]), about
    assert outcomes[0] >= 5 and outcomes[2] >= 5, outcomes  # both outcomes were exercised
    print(
        f"{FUZZ_CASES} cases ({outcomes[0]} written, {outcomes[2]} refused) in {time.monotonic() - started:.0f} s"
    )
