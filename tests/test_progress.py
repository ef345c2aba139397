"""flearning.io.progress: outside a terminal, progress is a plain line per interval, never a '\\r' bar."""

from __future__ import annotations

import io

from flearning.io.progress import LogLines, duration, progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_terminal_one_line_per_interval_with_values():
    stream, clock = io.StringIO(), FakeClock()
    bar = progress_bar(total=120, desc="forget", unit="step", file=stream, interval=10.0, clock=clock)
    assert isinstance(bar, LogLines)
    for step in range(1, 121):
        clock.now += 0.5  # 2 steps/s: a line every 20 steps
        bar.set_postfix(loss=f"{1.0 / step:.4f}", refresh=False)  # as the trainer does: then update
        bar.update(1)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # 60 s of work: a line each 10 s before the end, and the closing line
    assert len(lines) == 60 // 10
    assert lines[0] == "forget: step 20/120 (17%), loss 0.0500, 2.0 step/s, eta 50 s"
    assert lines[1].startswith("forget: step 40/120 (33%), loss 0.0250, 2.0 step/s, eta 40 s")
    assert lines[-1] == "forget: step 120/120 (100%), loss 0.0083, 2.0 step/s, done in 1 min 0 s"


def test_iterating_and_a_resumed_count():
    stream, clock = io.StringIO(), FakeClock()
    seen = []
    for item in progress_bar(range(30), desc="scoring", unit="batch", file=stream, interval=5.0, clock=clock):
        clock.now += 1.0
        seen.append(item)
    assert seen == list(range(30))
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "scoring: batch 5/30 (17%), 1.0 batch/s, eta 25 s"
    assert lines[-1] == "scoring: batch 30/30 (100%), 1.0 batch/s, done in 30 s"

    stream, clock = io.StringIO(), FakeClock()
    bar = progress_bar(total=4, desc="bench runs", unit="run", file=stream, interval=60.0, clock=clock)
    for name in ("ft", "lora", "ft-c", "flearning-ft"):
        bar.set_postfix_str(f"zsre seed 0 {name}")
        clock.now += 95.0
        bar.update(1)
    bar.close()
    assert (
        stream.getvalue().splitlines()[0]
        == "bench runs: run 1/4 (25%), zsre seed 0 ft, 95.0 s/run, eta 4 min 45 s"
    )

    stream, clock = io.StringIO(), FakeClock()
    bar = progress_bar(total=10, initial=6, desc="learn", unit="step", file=stream, interval=1.0, clock=clock)
    clock.now += 4.0
    bar.update(2)
    bar.close()
    # the rate counts the steps of this process, not the 6 done before the resume
    assert stream.getvalue().splitlines() == [
        "learn: step 8/10 (80%), 2.0 s/step, eta 4 s",
        "learn: step 8/10 (80%), 2.0 s/step, done in 4 s",
    ]


def test_a_short_bar_that_is_not_kept_leaves_no_line_and_disabled_writes_nothing():
    stream, clock = io.StringIO(), FakeClock()
    for _ in progress_bar(range(3), desc="scoring", file=stream, leave=False, clock=clock):
        clock.now += 0.1
    assert stream.getvalue() == ""
    bar = progress_bar(total=5, desc="x", enabled=False, file=stream, interval=0.0, clock=clock)
    bar.update(5)
    bar.set_postfix(loss="1")
    bar.close()
    assert stream.getvalue() == ""


def test_a_terminal_gets_the_tqdm_bar():
    stream = FakeTerminal()
    bar = progress_bar(total=3, desc="forget", unit="step", file=stream)
    assert not isinstance(bar, LogLines)
    bar.update(3)
    bar.close()
    assert "\r" in stream.getvalue()


def test_duration():
    assert [duration(s) for s in (0.4, 57, 725, 7380)] == ["0 s", "57 s", "12 min 5 s", "2 h 3 min"]
