"""Where training metrics go: metrics.jsonl always; TensorBoard, W&B and MLflow when configured and installed.

Trackers follow Axolotl's keys: ``use_tensorboard``; W&B when ``wandb_project`` is set (``wandb_entity``,
``wandb_name``, ``wandb_run_id``, ``wandb_mode``; ``use_wandb: false`` turns it off); MLflow when ``use_mlflow`` or
``mlflow_experiment_name`` is set (``mlflow_tracking_uri``, ``mlflow_run_name``). A tracker that is configured but
not installed is skipped with a warning naming the package; training goes on. Every tracker gets the numeric
fields of each record (all but ``step``) at that record's step, and is closed when training ends.

Each logged step is one JSON object per line in ``<output_dir>/metrics.jsonl`` (step, loss, lr, grad_norm,
tokens_per_s, and eval_loss / eval_ppl when evaluated). A resumed run appends, dropping any lines past the
step it resumes from, so the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kimitune.config import TrainConfig

log = logging.getLogger(__name__)


class MetricsLogger:
    """Writes metrics to metrics.jsonl and to the optional trackers the config names."""

    def __init__(self, config: TrainConfig, output_dir: Path, resume_step: int = 0) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.records = [r for r in kept if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self._trackers = _open_trackers(config, output_dir)

    def log(self, record: dict[str, Any]) -> None:
        """Appends one record (must hold `step`) to the file and forwards it to the trackers."""
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        for tracker in self._trackers:
            tracker(numbers, record["step"])

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of every record that has `key`."""
        rows = [(r["step"], r[key]) for r in self.records if key in r]
        return [s for s, _ in rows], [v for _, v in rows]

    def loss_figure(self):
        """The loss plot (a matplotlib Figure), or None before any step is logged. Eval losses are few points far
        apart, so they are drawn as markers only: a line between them would show a course nobody measured."""
        steps, losses = self.series("loss")
        if not steps:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, losses, label="train loss", linewidth=1)
        eval_steps, eval_losses = self.series("eval_loss")
        if eval_steps:
            ax.plot(eval_steps, eval_losses, linestyle="none", marker="o", label="eval loss")
        ax.set_title(f"{self.path.parent.resolve().name}: {'training and eval' if eval_steps else 'training'} loss, "
                     f"{steps[-1]} steps")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        accuracy_steps, accuracies = self.series("rewards/accuracies")  # a preference run's
        if accuracy_steps:
            right = ax.twinx()
            right.plot(accuracy_steps, accuracies, color="tab:green", linewidth=1, label="reward accuracy")
            eval_steps, eval_accuracies = self.series("eval_rewards/accuracies")
            if eval_steps:
                right.plot(eval_steps, eval_accuracies, color="tab:green", linestyle="none", marker="s",
                           label="eval reward accuracy")
            right.set_ylim(0, 1)
            right.set_ylabel("pairs ranked right")
            more_handles, more_labels = right.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        ax.legend(handles, labels)
        fig.tight_layout()
        return fig

    def plot(self, path: Path) -> Path | None:
        """Saves ``loss_figure`` as a PNG; returns its path, or None with no data."""
        fig = self.loss_figure()
        if fig is None:
            return None
        import matplotlib.pyplot as plt

        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def close(self) -> None:
        for tracker in self._trackers:
            close = getattr(tracker, "close", None)
            if close is not None:
                close()


def _open_trackers(config: TrainConfig, output_dir: Path) -> list[Any]:
    """The trackers the config turns on (Axolotl's rules), each skipped with a warning when not installed."""
    trackers: list[Any] = []
    if config.use_tensorboard:
        trackers.append(_optional(_TensorBoard, output_dir, name="tensorboard"))
    if config.wandb_project and config.use_wandb is not False:
        trackers.append(_optional(_WandB, config, name="wandb"))
    if config.use_mlflow or config.mlflow_experiment_name:
        trackers.append(_optional(_MLflow, config, name="mlflow"))
    return [t for t in trackers if t is not None]


def _optional(factory, *args, name: str):
    try:
        return factory(*args)
    except ImportError as err:
        log.warning("%s is configured but cannot be imported (%s): not logging to it; pip install %s "
                    "(or kimitune[logging])", name, err, name)
        return None


class _TensorBoard:
    """Scalars under their metrics.jsonl names in <output_dir>/tensorboard (torch.utils.tensorboard)."""

    def __init__(self, output_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def __call__(self, numbers: dict[str, float], step: int) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """One W&B run (project, entity, name, id, mode from the config; the whole config as its config)."""

    def __init__(self, config: TrainConfig) -> None:
        import wandb

        kwargs: dict[str, Any] = {
            "project": config.wandb_project, "entity": config.wandb_entity, "name": config.wandb_name,
            "config": config.model_dump(mode="json"),
        }
        if config.wandb_mode is not None:
            kwargs["mode"] = config.wandb_mode
        if config.wandb_run_id is not None:
            kwargs.update(id=config.wandb_run_id, resume="allow")
        self.run = wandb.init(**kwargs)

    def __call__(self, numbers: dict[str, float], step: int) -> None:
        self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    """One MLflow run in mlflow_experiment_name at mlflow_tracking_uri (MLflow's defaults when unset)."""

    def __init__(self, config: TrainConfig) -> None:
        import mlflow

        if config.mlflow_tracking_uri:
            mlflow.set_tracking_uri(config.mlflow_tracking_uri)
        if config.mlflow_experiment_name:
            mlflow.set_experiment(config.mlflow_experiment_name)
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=config.mlflow_run_name)

    def __call__(self, numbers: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(numbers, step=step)

    def close(self) -> None:
        self.mlflow.end_run()
