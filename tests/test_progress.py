"""Progress: one plain line per finished step in a log, bars only on a terminal, nothing when off."""

from __future__ import annotations

import io
import re

from cellmorph.progress import Progress, format_seconds


def test_a_log_gets_one_line_per_step_with_time_left_and_no_bar_lines():
    stream = io.StringIO()  # not a TTY, like nohup or a Slurm log
    with Progress(True, stream) as progress:
        assert progress.mode == "log"
        folds = progress.task("folds", 3)
        batches = progress.task("  batches", 100, log=False)
        for k in range(3):
            for _ in range(100):
                batches.advance()
            folds.advance(info=f"(fold {k})")
        progress.line("done")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] folds 1/3 \(fold 0\); elapsed \d+ s, about \d+ s left", lines[0])
    assert lines[2].endswith("about 0 s left") and lines[3].endswith("] done")


def test_disabled_progress_writes_nothing_and_reset_restarts_the_count():
    stream = io.StringIO()
    with Progress(False, stream) as progress:
        epochs = progress.task("epochs", 2)
        epochs.advance()
        epochs.reset(5, "epochs (fold 2)")
        assert (epochs.done, epochs.total, epochs.description) == (0, 5, "epochs (fold 2)")
        progress.line("hidden")
    assert stream.getvalue() == ""


def test_format_seconds():
    assert [format_seconds(s) for s in (4, 300, 3 * 3600)] == ["4 s", "5 min", "3.0 h"]
