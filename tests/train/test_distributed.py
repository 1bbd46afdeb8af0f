"""Two processes (torchrun, gloo, CPU) train exactly as one process with the same global batch, and a checkpoint
written by two processes resumes on one.

Every run goes through the real entry point, ``python -m torch.distributed.run --nproc_per_node 2 -m kimitune
train CONFIG``; the one-process runs call the same Trainer in-process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_preference_training import pairs_data, unpaired_data  # noqa: F401  (fixtures)
from test_trainer import ROOT, losses, raw_config, run, small_data  # noqa: F401  (small_data is a fixture)

from kimitune.train.checkpointing import list_checkpoints

# The same global batch: 2 ranks x 1 micro-batch per step on one side, 1 process x 2 micro-batches on the other.
TWO = {"gradient_accumulation_steps": 1}
ONE = {"gradient_accumulation_steps": 2}
STEPS = {"max_steps": 4, "save_steps": 2, "eval_steps": 2}


def torchrun(raw: dict, tmp_path: Path, nproc: int = 2) -> str:
    config = tmp_path / f"{Path(raw['output_dir']).name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", "kimitune", "train", str(config)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        raise
    assert proc.returncode == 0, output[-6000:]
    return output


def eval_losses(output_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


def assert_close(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    assert all(math.isclose(x, y, rel_tol=0, abs_tol=1e-5) for (_, x), (_, y) in zip(a, b)), (a, b)


def test_full_finetune_on_two_ranks_equals_one_process_and_resumes_on_one(small_data, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    output = torchrun(raw_config(small_data, two, **STEPS, **TWO), tmp_path)
    assert "weights built on rank 0 only; 1 rank(s) received their shards" in output  # rank 1 built on meta
    run(raw_config(small_data, one, **STEPS, **ONE))
    assert_close(losses(two), losses(one))
    assert all(math.isclose(x, y, abs_tol=1e-5) for x, y in zip(eval_losses(two), eval_losses(one)))
    # Rank 0 wrote the model in the release layout, as one process does; rank 1 wrote its optimizer shard.
    assert (two / "model.safetensors").is_file() and (two / "config.json").is_file()
    checkpoint = list_checkpoints(two)[-1]
    assert checkpoint.name == "checkpoint-2"
    assert (checkpoint / "rng_state.rank1.json").is_file() and (checkpoint / "optimizer/.metadata").is_file()

    # Resume the two-rank run on one process (no process group), with the same global batch.
    run(raw_config(small_data, two, resume_from_checkpoint=True, **STEPS, **ONE))
    assert_close(losses(two), losses(one))


def test_lora_on_two_ranks_with_activation_checkpointing_equals_one_process(small_data, tmp_path):
    lora = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True, "lora_target_experts": True,
            "learning_rate": 1e-2}
    fsdp = {"fsdp_version": 2, "fsdp_config": {"activation_checkpointing": True, "reshard_after_forward": True}}
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun(raw_config(small_data, two, **STEPS, **TWO, **lora, **fsdp), tmp_path)
    run(raw_config(small_data, one, **STEPS, **ONE, **lora))
    assert_close(losses(two), losses(one))
    assert (two / "adapter_model.safetensors").is_file() and (two / "adapter_config.json").is_file()
    from safetensors.torch import load_file

    gathered, single = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert gathered.keys() == single.keys()
    assert all((gathered[k] - single[k]).abs().max() < 1e-4 for k in single)


def test_fsdp_config_keys_are_checked():
    from kimitune.config import ConfigError, parse_config

    base = {"init_from_config": "x.json", "tokenizer": "t"}
    config, warnings = parse_config(base | {"fsdp_version": 2, "fsdp_config": {
        "fsdp_offload_params": True, "reshard_after_forward": False, "state_dict_type": "FULL_STATE_DICT"}})
    assert config.fsdp_config.offload_params and not config.fsdp_config.reshard_after_forward
    assert any("state_dict_type" in w for w in warnings)
    with pytest.raises(ConfigError, match="did you mean `offload_params`"):
        parse_config(base | {"fsdp_config": {"ofload_params": True}})
    with pytest.raises(ConfigError, match="FSDP2 only"):
        parse_config(base | {"fsdp_version": 1})


def test_qlora_on_two_ranks_equals_one_process(small_data, tmp_path):
    """4-bit frozen weights are buffers: FSDP2 leaves them whole on every rank and shards the LoRA weights."""
    pytest.importorskip("bitsandbytes")
    qlora = {"adapter": "qlora", "load_in_4bit": True, "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
             "learning_rate": 1e-2}
    steps = {"max_steps": 2, "eval_steps": 2}
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun(raw_config(small_data, two, **steps, **TWO, **qlora), tmp_path)
    run(raw_config(small_data, one, **steps, **ONE, **qlora))
    assert_close(losses(two), losses(one))
    assert (two / "adapter_model.safetensors").is_file()


def test_ce_lora_runs_on_two_ranks(small_data, tmp_path):
    """CE-LoRA's buffers come from the whole weights, so every rank builds them before sharding (no meta build).
    Keeping every row, two ranks equal one process; approximating, each rank picks its rows from its own
    micro-batch's output gradients (the method's data-dependent choice), so from the second step on the two runs
    differ slightly and only the first loss is equal."""
    ce_lora = {"adapter": "ce_lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
               "learning_rate": 1e-2}
    steps = {"max_steps": 2, "eval_steps": 2}
    for sparsity in (0.0, 0.5):
        two, one = tmp_path / f"two-{sparsity}", tmp_path / f"one-{sparsity}"
        torchrun(raw_config(small_data, two, **steps, **TWO, **ce_lora, ce_lora_sparsity=sparsity), tmp_path)
        run(raw_config(small_data, one, **steps, **ONE, **ce_lora, ce_lora_sparsity=sparsity))
        if sparsity == 0.0:
            assert_close(losses(two), losses(one))
        else:
            (_, first_two), (_, second_two) = losses(two)
            (_, first_one), (_, second_one) = losses(one)
            assert math.isclose(first_two, first_one, abs_tol=1e-5)
            assert math.isclose(second_two, second_one, rel_tol=1e-3) and second_two < first_two


@pytest.mark.parametrize("kind, split", [("dpo", False), ("kto", False), ("dpo", True), ("orpo", True), ("kto", True)])
def test_preference_tuning_with_lora_on_two_ranks_equals_one_process(pairs_data, unpaired_data, tmp_path, kind,
                                                                      split):
    """Preference tuning under torchrun: the pairs (KTO: samples) dealt out across the ranks, the loss and the
    rewards summed over them (KTO's KL estimate too, over the whole step's samples), the reference computed on every
    rank (so FSDP's passes stay in step): as one process with the same batch. ``split``: both ranks take the same
    batches and split each row (context_parallel_size 2; the rows padded to an even length after their pairs)."""
    from test_preference_training import raw_config as dpo_config

    lora = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True, "learning_rate": 1e-2}
    data, extra = (unpaired_data, {"rl": "kto", "rl_beta": 0.5}) if kind == "kto" else (pairs_data, {"rl": kind})
    two, one = tmp_path / "two", tmp_path / "one"
    ranks = {"context_parallel_size": 2, **ONE} if split else TWO
    torchrun(dpo_config(data, two, **STEPS, **ranks, **lora, **extra), tmp_path)
    run(dpo_config(data, one, **STEPS, **ONE, **lora, **extra))
    assert_close(losses(two), losses(one))
    figure = "kl" if kind == "kto" else "rewards/margins"
    rewards = lambda out: [(r["step"], r[figure]) for r in  # noqa: E731
                           map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if figure in r]
    assert_close(rewards(two), rewards(one))
    assert all(math.isclose(x, y, abs_tol=1e-5) for x, y in zip(eval_losses(two), eval_losses(one)))


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_context_parallel_on_two_ranks_equals_one_process_and_resumes_on_one(small_data, tmp_path, adapter):
    """context_parallel_size: 2 under torchrun: both ranks take the same micro-batches and each computes half of
    every row (FSDP2 over the 2-D mesh, flattened), so the run is the one-process run with the same batches: losses
    and eval losses within 1e-5 (full fine-tuning; LoRA with every layer recomputed). A checkpoint written with the
    rows split resumes on one process and continues as that run does."""
    extra = {} if adapter == "full" else {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
                                          "learning_rate": 1e-2, "gradient_checkpointing": True}
    split, one = tmp_path / "split", tmp_path / "one"
    torchrun(raw_config(small_data, split, **STEPS, **ONE, **extra, context_parallel_size=2), tmp_path)
    run(raw_config(small_data, one, **STEPS, **ONE, **extra))
    assert_close(losses(split), losses(one))
    assert all(math.isclose(x, y, abs_tol=1e-5) for x, y in zip(eval_losses(split), eval_losses(one)))
    if adapter == "full":
        assert list_checkpoints(split)[-1].name == "checkpoint-2"
        run(raw_config(small_data, split, resume_from_checkpoint=True, **STEPS, **ONE))
        assert_close(losses(split), losses(one))


def test_context_parallel_settings_that_cannot_work_are_refused(small_data, tmp_path):
    from kimitune.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="does not work with recompute_segment_layers"):
        parse_config(raw_config(small_data, tmp_path, context_parallel_size=2, gradient_checkpointing=True,
                                recompute_segment_layers=2))
    with pytest.raises(ConfigError, match="sequence_piece_len"):
        parse_config(raw_config(small_data, tmp_path, context_parallel_size=2, gradient_checkpointing=True,
                                sequence_piece_len=64))
    with pytest.raises(ConfigError, match="load_in_8bit weights are not sharded"):
        parse_config(raw_config(small_data, tmp_path, context_parallel_size=2, adapter="lora", load_in_8bit=True,
                                fsdp_config={"offload_params": True}))
    with pytest.raises(ValueError, match="under torchrun"):
        run(raw_config(small_data, tmp_path / "alone", context_parallel_size=2))
    with pytest.raises(AssertionError, match="does not divide the 3 ranks"):
        torchrun(raw_config(small_data, tmp_path / "three", context_parallel_size=2), tmp_path, nproc=3)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_context_parallel_with_two_data_ranks_equals_one_process(small_data, tmp_path, adapter):
    """Four ranks: two data ranks (FSDP2 shards over them, each takes its micro-batches) by two context ranks (each
    row split in halves): as one process with the same global batch (full fine-tuning; LoRA with every layer
    recomputed, the MLA latents gathered again in the recomputation)."""
    extra = {} if adapter == "full" else {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
                                          "learning_rate": 1e-2, "gradient_checkpointing": True}
    four, one = tmp_path / "four", tmp_path / "one"
    torchrun(raw_config(small_data, four, **STEPS, **TWO, **extra, context_parallel_size=2), tmp_path, nproc=4)
    run(raw_config(small_data, one, **STEPS, **ONE, **extra))
    assert_close(losses(four), losses(one))
    assert all(math.isclose(x, y, abs_tol=1e-5) for x, y in zip(eval_losses(four), eval_losses(one)))


def test_context_sums_go_in_buckets_and_land_on_their_gradients(monkeypatch, tmp_path):
    """sum_over_context on a one-rank gloo group with buckets of 5 elements: every gradient keeps its values (the
    sum over one rank), whatever bucket it went in, float32 and bf16 apart."""
    import torch
    import torch.distributed as dist

    from kimitune.train import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        monkeypatch.setattr(distributed, "SUM_BUCKET_ELEMENTS", 5)
        params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n, dtype in
                  ((3, torch.float32), (4, torch.float32), (2, torch.bfloat16), (7, torch.float32), (1, torch.float32))]
        for i, p in enumerate(params):
            p.grad = torch.arange(p.numel(), dtype=p.dtype) + 10 * i
        expected = [p.grad.clone() for p in params]
        distributed.sum_over_context(params, distributed.World(context_group=dist.group.WORLD))
        assert all(torch.equal(p.grad, e) for p, e in zip(params, expected))
    finally:
        dist.destroy_process_group()
