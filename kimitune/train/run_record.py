"""The record a finished run leaves in its output_dir: ``final_state.json``, the step its saved model is from.

Written after the final model, so it names a model that is complete. A later run reads it to tell a finished
model from older weights: a resumed run must not end below that step and replace the model with an older one
(``kimitune.train.resume_checks``), and its presence marks the folder as holding a run (``output_dir``).
"""

from __future__ import annotations

import json
from pathlib import Path

FINISHED_FILE = "final_state.json"


def record_finished(output_dir: Path, step: int) -> None:
    """Notes that the model saved in ``output_dir`` is the one of optimizer step ``step``."""
    (output_dir / FINISHED_FILE).write_text(json.dumps({"step": step}) + "\n")


def finished_step(output_dir: Path) -> int | None:
    """The step of the finished model in ``output_dir``, or None when no finished run is recorded there."""
    path = output_dir / FINISHED_FILE
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["step"])
    except (ValueError, KeyError, TypeError):  # unreadable: treat as unknown rather than refuse every resume
        return None
