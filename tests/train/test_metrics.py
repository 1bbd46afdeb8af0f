"""Experiment trackers: TensorBoard, W&B and MLflow get every logged number at its step and are closed; a tracker
that is configured but not installed is skipped with a warning; the keys are Axolotl's."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest
from rich.console import Console

from kimitune.config import parse_config
from kimitune.train.metrics import MetricsLogger

ROOT = Path(__file__).resolve().parents[2]
RECORDS = [
    {"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 1000.0},
    {"step": 2, "loss": 2.25, "lr": 9e-4, "grad_norm": 0.5, "tokens_per_s": 1100.0, "eval_loss": 2.0,
     "eval_ppl": 7.38905609893065},
]


def config(tmp_path: Path, **keys):
    cfg, _ = parse_config({"init_from_config": "x", "output_dir": str(tmp_path), **keys})
    return cfg


def expected(records=RECORDS) -> list[tuple[int, dict[str, float]]]:
    return [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in records]


# ----- fakes that record the calls kimitune makes -------------------------------------------------------------------

class FakeWandb(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("wandb")
        self.init_kwargs: dict | None = None
        self.logged: list[tuple[int, dict]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        module = self

        class Run:
            def log(self, data, step=None):
                module.logged.append((step, dict(data)))

            def finish(self):
                module.finished += 1

        return Run()


class FakeMlflow(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("mlflow")
        self.calls: list[tuple] = []
        self.logged: list[tuple[int, dict]] = []

    def set_tracking_uri(self, uri):
        self.calls.append(("set_tracking_uri", uri))

    def set_experiment(self, name):
        self.calls.append(("set_experiment", name))

    def start_run(self, run_name=None):
        self.calls.append(("start_run", run_name))
        return object()

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def end_run(self):
        self.calls.append(("end_run",))


class FakeSummaryWriter:
    instances: list[FakeSummaryWriter] = []

    def __init__(self, log_dir=None) -> None:
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


@pytest.fixture
def fake_wandb(monkeypatch) -> FakeWandb:
    module = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


@pytest.fixture
def fake_mlflow(monkeypatch) -> FakeMlflow:
    module = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", module)
    return module


@pytest.fixture
def fake_tensorboard(monkeypatch) -> type[FakeSummaryWriter]:
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeSummaryWriter
    FakeSummaryWriter.instances = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return FakeSummaryWriter


def log_all(cfg, tmp_path: Path) -> MetricsLogger:
    logger = MetricsLogger(cfg, tmp_path)
    for record in RECORDS:
        logger.log(record)
    logger.close()
    return logger


# ----- W&B ------------------------------------------------------------------------------------------------------------

def test_wandb_gets_every_number_at_its_step_and_is_finished(tmp_path, fake_wandb):
    cfg = config(tmp_path, wandb_project="kimi", wandb_entity="team", wandb_name="run-1", wandb_mode="offline",
                 wandb_run_id="abc123", learning_rate=1e-3)
    log_all(cfg, tmp_path)
    kwargs = fake_wandb.init_kwargs
    assert (kwargs["project"], kwargs["entity"], kwargs["name"], kwargs["mode"]) == ("kimi", "team", "run-1",
                                                                                     "offline")
    assert (kwargs["id"], kwargs["resume"]) == ("abc123", "allow")
    assert kwargs["config"]["learning_rate"] == 1e-3 and kwargs["config"]["wandb_project"] == "kimi"
    json.dumps(kwargs["config"])  # W&B gets plain JSON values
    assert fake_wandb.logged == expected()
    assert fake_wandb.finished == 1


def test_wandb_needs_a_project_and_use_wandb_false_turns_it_off(tmp_path, fake_wandb):
    log_all(config(tmp_path, wandb_entity="team", wandb_name="run-1"), tmp_path)
    log_all(config(tmp_path, wandb_project="kimi", use_wandb=False), tmp_path)
    assert fake_wandb.init_kwargs is None and fake_wandb.logged == []


def test_wandb_defaults_leave_mode_and_id_to_wandb(tmp_path, fake_wandb):
    log_all(config(tmp_path, wandb_project="kimi"), tmp_path)
    assert "mode" not in fake_wandb.init_kwargs and "id" not in fake_wandb.init_kwargs
    assert fake_wandb.init_kwargs["entity"] is None and fake_wandb.init_kwargs["name"] is None


# ----- MLflow ---------------------------------------------------------------------------------------------------------

def test_mlflow_gets_every_number_at_its_step_and_the_run_is_ended(tmp_path, fake_mlflow):
    cfg = config(tmp_path, use_mlflow=True, mlflow_tracking_uri="file:///tmp/mlruns",
                 mlflow_experiment_name="kimi", mlflow_run_name="run-1")
    log_all(cfg, tmp_path)
    assert fake_mlflow.calls == [("set_tracking_uri", "file:///tmp/mlruns"),
                                 ("set_experiment", "kimi"), ("start_run", "run-1"), ("end_run",)]
    assert fake_mlflow.logged == expected()


def test_mlflow_is_on_with_an_experiment_name_as_in_axolotl(tmp_path, fake_mlflow):
    log_all(config(tmp_path, mlflow_experiment_name="kimi"), tmp_path)
    assert fake_mlflow.calls[0] == ("set_experiment", "kimi") and fake_mlflow.calls[-1] == ("end_run",)
    assert fake_mlflow.logged == expected()


def test_mlflow_off_by_default_even_with_a_tracking_uri(tmp_path, fake_mlflow):
    log_all(config(tmp_path, mlflow_tracking_uri="file:///tmp/mlruns"), tmp_path)
    assert fake_mlflow.calls == [] and fake_mlflow.logged == []


# ----- TensorBoard ----------------------------------------------------------------------------------------------------

def test_tensorboard_writer_gets_every_scalar_and_is_closed(tmp_path, fake_tensorboard):
    log_all(config(tmp_path, use_tensorboard=True), tmp_path)
    (writer,) = fake_tensorboard.instances
    assert writer.log_dir == str(tmp_path / "tensorboard")
    assert writer.scalars == [(k, v, step) for step, numbers in expected() for k, v in numbers.items()]
    assert writer.closed


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_all(config(tmp_path, use_tensorboard=True), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "eval_ppl"}
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.25)]
    assert [(e.step, e.value) for e in events.Scalars("eval_loss")] == [(2, 2.0)]
    assert events.Scalars("lr")[0].value == pytest.approx(1e-3)


# ----- configured but not installed -----------------------------------------------------------------------------------

@pytest.mark.parametrize("module, keys", [
    ("wandb", {"wandb_project": "kimi"}),
    ("mlflow", {"use_mlflow": True}),
    ("torch.utils.tensorboard", {"use_tensorboard": True}),
])
def test_a_configured_tracker_that_is_not_installed_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog,
                                                                              module, keys):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    with caplog.at_level(logging.WARNING, logger="kimitune.train.metrics"):
        logger = log_all(config(tmp_path, **keys), tmp_path)
    name = {"torch.utils.tensorboard": "tensorboard"}.get(module, module)
    (message,) = [r.getMessage() for r in caplog.records]
    assert f"{name} is configured but cannot be imported" in message and f"pip install {name}" in message
    # training metrics still go to metrics.jsonl
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == RECORDS == logger.records


# ----- the keys are Axolotl's -----------------------------------------------------------------------------------------

def test_tracker_keys_are_axolotls():
    # Axolotl's schema (src/axolotl/utils/schemas/integrations.py: WandbConfig, MLFlowConfig; use_tensorboard).
    cfg, warnings = parse_config({
        "init_from_config": "x", "use_tensorboard": True, "use_wandb": True, "wandb_project": "p",
        "wandb_entity": "e", "wandb_name": "n", "wandb_run_id": "i", "wandb_mode": "disabled", "wandb_watch": "all",
        "wandb_log_model": "end", "use_mlflow": True, "mlflow_tracking_uri": "u", "mlflow_experiment_name": "x",
        "mlflow_run_name": "r", "hf_mlflow_log_artifacts": True,
    })
    assert cfg.wandb_mode == "disabled" and cfg.mlflow_run_name == "r"
    inert = {w.split("`")[1] for w in warnings}
    assert inert == {"wandb_watch", "wandb_log_model", "hf_mlflow_log_artifacts"}


# ----- through the trainer ----------------------------------------------------------------------------------------------

def small_run(tmp_path: Path, **trackers):
    """A two-step run of the tiny model on 24 quickstart conversations, with ``trackers``' config keys."""
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((ROOT / "examples/data/quickstart_train.jsonl").read_text().splitlines()[:24]) + "\n")
    cfg, _ = parse_config({
        "init_from_config": str(ROOT / "examples/models/tiny.json"), "tokenizer": str(ROOT / "examples/tokenizer"),
        "datasets": [{"path": str(data)}], "dataset_prepared_path": str(tmp_path / "cache"),
        "sequence_len": 256, "sample_packing": True, "micro_batch_size": 2, "max_steps": 2, "logging_steps": 1,
        "output_dir": str(tmp_path / "out"), **trackers,
    })
    return cfg


def test_trainer_logs_each_step_to_the_trackers_and_closes_them(tmp_path, fake_wandb, fake_mlflow, fake_tensorboard):
    from kimitune.train.trainer import Trainer

    cfg = small_run(tmp_path, use_tensorboard=True, wandb_project="kimi", mlflow_experiment_name="kimi")
    Trainer(cfg, Console(quiet=True)).train()
    jsonl = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == [1, 2]
    assert fake_wandb.logged == fake_mlflow.logged == expected(jsonl)
    assert {"loss", "lr", "grad_norm"} <= set(fake_wandb.logged[0][1])
    assert fake_wandb.finished == 1 and fake_mlflow.calls[-1] == ("end_run",)
    (writer,) = fake_tensorboard.instances
    assert writer.closed and [s for _, _, s in writer.scalars] == [s for s, numbers in expected(jsonl) for _ in numbers]


def test_trackers_are_closed_when_the_run_fails(tmp_path, fake_wandb, monkeypatch):
    from kimitune.train import trainer as trainer_module

    cfg = small_run(tmp_path, wandb_project="kimi")

    def broken_clip(params, max_norm):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(trainer_module.distributed, "clip_grad_norm", broken_clip)
    with pytest.raises(RuntimeError, match="injected failure"):
        trainer_module.Trainer(cfg, Console(quiet=True)).train()
    assert fake_wandb.finished == 1


def test_the_loss_plot_has_a_title_and_draws_the_evals_as_points(tmp_path):
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    logger = MetricsLogger(config(run_dir), run_dir)
    for record in RECORDS + [{"step": 3, "eval_loss": 1.75}]:
        logger.log(record)
    figure = logger.loss_figure()
    (axes,) = figure.axes
    assert axes.get_title() == "my-run: training and eval loss, 2 steps"
    train, evals = axes.get_lines()
    assert list(train.get_xdata()) == [1, 2] and train.get_linestyle() == "-"
    assert list(evals.get_xdata()) == [2, 3] and evals.get_marker() == "o" and evals.get_linestyle() == "None"
    assert logger.plot(tmp_path / "curve.png") == tmp_path / "curve.png" and (tmp_path / "curve.png").is_file()
