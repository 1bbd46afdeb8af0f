"""Without a terminal, every logged step is a plain line of its own (a live bar leaves only its last state in a log
file); on a terminal the live bar stays."""

from __future__ import annotations

import io
import re

from rich.console import Console
from rich.progress import Progress
from test_trainer import raw_config, small_data  # noqa: F401  (small_data is a fixture)

from kimitune.config import parse_config
from kimitune.train.progress import PlainProgress, step_line, training_progress
from kimitune.train.trainer import Trainer

LINE = re.compile(r"^step (\d+)/3  loss \d+\.\d{4}  lr \d\.\d\de-\d\d  grad norm \d+\.\d{3}  [\d,]+ tokens/s"
                  r"(  eval loss \d+\.\d{4})?  eta \d+:\d\d:\d\d$")


def test_a_log_file_gets_one_line_per_logged_step(small_data, tmp_path):
    log = io.StringIO()
    config, _ = parse_config(raw_config(small_data, tmp_path, max_steps=3, logging_steps=2, save_steps=None,
                                        eval_steps=3))
    Trainer(config, Console(file=log, width=80)).train()
    lines = [line for line in log.getvalue().splitlines() if line.startswith("step ")]
    assert [LINE.match(line) is not None for line in lines] == [True, True], lines
    assert [int(LINE.match(line)[1]) for line in lines] == [2, 3]  # every 2nd step, and the last
    assert "eval loss" in lines[-1] and lines[-1].endswith("eta 0:00:00")


def test_the_line_holds_every_field_and_the_eta():
    record = {"step": 30, "loss": 2.34567, "lr": 2.5e-4, "grad_norm": 0.98765, "tokens_per_s": 12345.6}
    assert step_line(record, 50, 41.4) == ("step 30/50  loss 2.3457  lr 2.50e-04  grad norm 0.988  12,346 tokens/s  "
                                           "eta 0:00:41")
    assert step_line({"step": 50, "eval_loss": 1.5}, 50, None) == "step 50/50  eval loss 1.5000"


def test_a_terminal_gets_the_live_bar():
    assert isinstance(training_progress(Console(file=io.StringIO(), force_terminal=True)), Progress)
    assert isinstance(training_progress(Console(file=io.StringIO())), PlainProgress)
