"""`kimitune plan`: the predicted peak GPU memory matches the measured runs, counts weights by format, and the
suggested settings fit."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kimitune.cli import app
from kimitune.config import ConfigError, parse_config
from kimitune.model import KimiLinearConfig
from kimitune.plan import GIB, Part, load_model_config, parse_memory, predict_peak_memory, suggest_settings

ROOT = Path(__file__).resolve().parents[1]


def widths_48b(layers: int = 4) -> KimiLinearConfig:
    """benchmarks/train_gpu.py's model: the 48B widths with `layers` layers (KDA, KDA, KDA, MLA; layer 1 dense)."""
    base = KimiLinearConfig.preset("kimi-linear-48b-a3b")
    kda = [i for i in range(1, layers + 1) if i % 4 != 0]
    return replace(base, num_hidden_layers=layers, kda_layers=kda,
                   full_attn_layers=[i for i in range(1, layers + 1) if i not in kda])


def train_config(**keys):
    raw = {"base_model": "unused", "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True,
           "sequence_len": 4096, "micro_batch_size": 1, "optimizer": "adamw_torch_fused"} | keys
    return parse_config(raw)[0]


# Measured peaks (torch.cuda.max_memory_allocated, GiB) of kimitune's LoRA step in benchmarks/train_gpu.py:
# 4-layer 48B widths, bf16 weights, no autocast, one unpacked sequence, LoRA r=16 all-linear (+ the experts where
# marked), fused AdamW, fla's fused norms and gate, the weighted expert SwiGLU. benchmarks/RESULTS.md, "LoRA
# training on one GPU against transformers + PEFT (issue 7)", H100, 2026-11-26.
MEASURED = [
    (4096, False, False, 14.6),
    (4096, True, False, 13.3),
    (16384, True, False, 16.9),
    (4096, False, True, 16.5),
    (4096, True, True, 14.7),
]


@pytest.mark.parametrize("seq, ckpt, experts, measured", MEASURED)
def test_plan_is_within_5_percent_of_the_measured_peaks(seq, ckpt, experts, measured):
    # The issue asks for 10%; the plan has been within 1.3% of every row since its working-set terms.
    config = train_config(sequence_len=seq, gradient_checkpointing=ckpt, lora_target_experts=experts)
    plan = predict_peak_memory(config, widths_48b(), autocast=False, packed=False, fused=True)
    assert abs(plan.peak_allocated_gib / measured - 1) < 0.05, (plan.peak_allocated_gib, measured)


def test_plan_of_the_whole_48b_needs_no_weights_and_is_quick():
    start = time.perf_counter()
    plan = predict_peak_memory(train_config(gradient_checkpointing=True),
                               KimiLinearConfig.from_pretrained(ROOT / "examples/models/kimi-linear-48b-a3b.json"))
    assert time.perf_counter() - start < 20
    weights = next(i for i in plan.items if i.name == "frozen weights, bf16")
    assert weights.bytes / 1e9 == pytest.approx(2 * 49.12, rel=0.01)  # 49.12B parameters in bf16
    assert plan.device_total > plan.peak_allocated > weights.bytes


def test_weight_bytes_by_format():
    from kimitune.model.summary import summarize

    cfg = widths_48b()
    summary = summarize(cfg)
    quantized, kept = summary.quantizable_params, summary.total_params - summary.quantizable_params

    def weights(**keys):
        plan = predict_peak_memory(train_config(**keys), cfg)
        return {i.name: i.bytes for i in plan.items if i.name.startswith("frozen weights")}

    assert weights() == {"frozen weights, bf16": 2 * summary.total_params}
    int8 = weights(load_in_8bit=True)
    assert int8["frozen weights, bf16"] == 2 * kept
    assert quantized < int8["frozen weights, int8"] < 1.01 * quantized  # + one float32 scale per row
    nf4 = weights(load_in_4bit=True, adapter="qlora")["frozen weights, 4-bit"]
    assert nf4 == pytest.approx(quantized * (0.5 + 4 / 64))
    double = weights(load_in_4bit=True, adapter="qlora", bnb_4bit_use_double_quant=True)["frozen weights, 4-bit"]
    assert double == pytest.approx(quantized * (0.5 + 1 / 64 + 4 / 64 / 256))


def test_a_quantised_plan_holds_one_dequantised_expert_stack():
    cfg = widths_48b()
    plan = predict_peak_memory(train_config(load_in_4bit=True, adapter="qlora"), cfg)
    (item,) = [i for i in plan.items if i.name.startswith("dequantised")]
    assert item.bytes == 2 * cfg.num_experts * 2 * cfg.moe_intermediate_size * cfg.hidden_size  # gate_up, bf16


def test_an_8bit_plan_dequantises_no_expert_stack():
    """int8 and fp8 stacks multiply from 8 bits (kimitune.ops.quant_grouped_mm): the plan holds the largest
    dequantised projection instead of a stack."""
    cfg = widths_48b()
    for key in ("load_in_8bit", "load_in_fp8"):
        plan = predict_peak_memory(train_config(**{key: True}, adapter="lora"), cfg)
        (item,) = [i for i in plan.items if i.name.startswith("dequantised")]
        q_proj = cfg.hidden_size * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        assert 2 * q_proj <= item.bytes < 2 * cfg.num_experts * cfg.moe_intermediate_size * cfg.hidden_size


def test_lora_parameter_count_is_the_adapters(tmp_path):
    from kimitune.adapters import apply_lora
    from kimitune.train.settings import lora_settings
    from kimitune.model import KimiLinearForCausalLM

    cfg = KimiLinearConfig.from_pretrained(ROOT / "examples/models/tiny.json")
    for keys in ({"lora_target_linear": True}, {"lora_target_linear": True, "lora_target_experts": True},
                 {"lora_target_linear": False, "lora_target_modules": ["q_proj", "v_proj"]}):
        train = train_config(**keys)
        plan = predict_peak_memory(train, cfg)
        model = KimiLinearForCausalLM(cfg)
        for p in model.parameters():
            p.requires_grad_(False)
        apply_lora(model, lora_settings(train))
        real = sum(p.numel() for p in model.parameters() if p.requires_grad)
        (item,) = [i for i in plan.items if i.name.startswith("LoRA weights")]
        assert item.bytes == 4 * real


def test_what_lowers_the_peak_lowers_the_plan():
    cfg = widths_48b()
    base = predict_peak_memory(train_config(), cfg).peak_allocated
    assert predict_peak_memory(train_config(gradient_checkpointing=True), cfg).peak_allocated < base
    assert predict_peak_memory(train_config(sequence_len=2048), cfg).peak_allocated < base
    assert predict_peak_memory(train_config(load_in_8bit=True), cfg).peak_allocated < base
    assert predict_peak_memory(train_config(lora_target_linear=False, lora_target_modules=["q_proj"]),
                               cfg).peak_allocated < base
    assert predict_peak_memory(train_config(lora_target_experts=True), cfg).peak_allocated > base
    assert predict_peak_memory(train_config(), cfg, loss="full").peak_allocated > base + 4096 * 163840 * 8
    full = predict_peak_memory(train_config(adapter=None), cfg)
    assert full.peak_allocated > 16 * 6.4e9  # fp32 master weights, gradients and two AdamW states
    # With lora_dropout every adapted linear keeps its own dropped-out input and mask, not one shared reference.
    assert predict_peak_memory(train_config(lora_dropout=0.05), cfg).peak_allocated > base


# Measured with some layers recomputed (gradient_checkpointing_layers), benchmarks/RESULTS.md, 2026-11-26: the
# 4-layer model on an H100 (train_gpu.py --ckpt 1) and the whole 48B in bf16 on an H200 (train_48b.py --ckpt-layers
# 9,3).
MEASURED_PARTIAL = [(4, 4096, 1, 14.4), (4, 16384, 1, 21.5), (27, 8192, 9, 112.8), (27, 8192, 3, 118.1)]


@pytest.mark.parametrize("layers, seq, recomputed, measured", MEASURED_PARTIAL)
def test_plan_with_some_layers_recomputed_is_within_5_percent(layers, seq, recomputed, measured):
    cfg = widths_48b() if layers == 4 else KimiLinearConfig.from_pretrained(
        ROOT / "examples/models/kimi-linear-48b-a3b.json")
    config = train_config(sequence_len=seq, gradient_checkpointing=True, gradient_checkpointing_layers=recomputed)
    plan = predict_peak_memory(config, cfg, autocast=False, packed=False, fused=True)
    assert abs(plan.peak_allocated_gib / measured - 1) < 0.05, (plan.peak_allocated_gib, measured)


# The whole 48B with int8 weights, LoRA r=16 on every linear, one sequence, every layer recomputed in pieces of 16,384
# tokens, offloaded: benchmarks/train_long.py on an H100 80 GB (benchmarks/RESULTS.md, 2026-12-07).
MEASURED_LONG = [(131072, 53.6), (262144, 56.0)]


@pytest.mark.parametrize("seq, measured", MEASURED_LONG)
def test_plan_of_a_long_row_in_pieces_is_within_5_percent(seq, measured):
    cfg = KimiLinearConfig.from_pretrained(ROOT / "examples/models/kimi-linear-48b-a3b.json")
    config = train_config(sequence_len=seq, load_in_8bit=True, gradient_checkpointing=True, sequence_piece_len=16384,
                          activation_offloading=True)
    plan = predict_peak_memory(config, cfg, autocast=False, packed=False, fused=True)
    assert abs(plan.peak_allocated_gib / measured - 1) < 0.05, (plan.peak_allocated_gib, measured)


def test_kept_kda_intermediates_add_18_bytes_per_channel_in_each_kda_layer():
    """Measured on the whole 48B in bf16 at 8192 tokens, no layer recomputed, one H200 (benchmarks/RESULTS.md,
    2026-11-26): 121.4 GiB, and 132.6 with kda_keep_intermediates (train_48b.py --kda-keep)."""
    cfg = KimiLinearConfig.from_pretrained(ROOT / "examples/models/kimi-linear-48b-a3b.json")
    plans = [predict_peak_memory(train_config(sequence_len=8192, kda_keep_intermediates=keep), cfg, autocast=False,
                                 packed=False, fused=True) for keep in (False, True)]
    kda_layers = sum(cfg.is_kda_layer(i) for i in range(cfg.num_hidden_layers))
    channels = cfg.kda_num_heads * cfg.kda_head_dim
    assert plans[1].peak_allocated - plans[0].peak_allocated == 18 * channels * 8192 * kda_layers
    for plan, measured in zip(plans, (121.4, 132.6)):
        assert abs(plan.peak_allocated_gib / measured - 1) < 0.02, (plan.peak_allocated_gib, measured)
    # Too big with them kept: giving them back is the first suggestion.
    suggestions = suggest_settings(train_config(sequence_len=8192, kda_keep_intermediates=True), cfg,
                                   (plans[0].device_total + plans[1].device_total) / 2, autocast=False, packed=False)
    assert suggestions[0].change == {"kda_keep_intermediates": False}


def test_recomputing_some_layers_lies_between_none_and_all():
    cfg = widths_48b()
    peaks = [predict_peak_memory(train_config(sequence_len=16384, gradient_checkpointing=count != 0,
                                              gradient_checkpointing_layers=count or None), cfg).peak_allocated
             for count in (0, 1, 2, 3)]
    every = predict_peak_memory(train_config(sequence_len=16384, gradient_checkpointing=True), cfg).peak_allocated
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] > every
    assert predict_peak_memory(train_config(sequence_len=16384, gradient_checkpointing=True,
                                            gradient_checkpointing_layers=4), cfg).peak_allocated == every


def test_the_fewest_recomputed_layers_that_fit_come_first():
    cfg = widths_48b()
    train = train_config(sequence_len=16384)
    one, two = (predict_peak_memory(train_config(sequence_len=16384, gradient_checkpointing=True,
                                                 gradient_checkpointing_layers=count), cfg).device_total
                for count in (1, 2))
    suggestions = suggest_settings(train, cfg, (one + two) / 2)
    assert suggestions[0].change == {"gradient_checkpointing": True, "gradient_checkpointing_layers": 2}
    assert {"gradient_checkpointing": True} in [s.change for s in suggestions]
    assert suggestions[0].text == "gradient_checkpointing: true, gradient_checkpointing_layers: 2"


def test_suggestions_fit_and_name_the_changes():
    cfg = KimiLinearConfig.from_pretrained(ROOT / "examples/models/kimi-linear-48b-a3b.json")
    train = train_config(sequence_len=8192, micro_batch_size=2)
    gpu = 80 * GIB
    assert not predict_peak_memory(train, cfg).fits(gpu)
    suggestions = suggest_settings(train, cfg, gpu)
    assert suggestions
    for suggestion in suggestions:
        assert suggestion.plan.fits(gpu)
        change = {k: v for k, v in suggestion.change.items() if k != "gpus"}
        again = predict_peak_memory(train.model_copy(update=change), cfg, gpus=suggestion.change.get("gpus", 1))
        assert again.device_total == suggestion.plan.device_total
    assert any("load_in_4bit" in s.change for s in suggestions)
    # A small run fits and needs no suggestion.
    assert predict_peak_memory(train_config(sequence_len=512), widths_48b()).fits(gpu)


def test_parse_memory():
    assert parse_memory("80GiB") == 80 * GIB
    assert parse_memory("80") == 80 * GIB
    assert parse_memory("141 GB") == 141e9
    assert parse_memory("81559MiB") == 81559 * 2**20
    with pytest.raises(ValueError, match="memory size"):
        parse_memory("lots")


def test_model_config_from_init_or_base_model_folder(tmp_path):
    cfg, _ = parse_config({"init_from_config": str(ROOT / "examples/models/tiny.json")})
    assert load_model_config(cfg).hidden_size == 128
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((ROOT / "examples/models/tiny.json").read_text())
    cfg, _ = parse_config({"base_model": str(folder), "adapter": "lora", "lora_target_linear": True})
    assert load_model_config(cfg).num_hidden_layers == 4
    cfg, _ = parse_config({"base_model": "moonshotai/not-downloaded"})
    with pytest.raises(ConfigError, match="config.json"):
        load_model_config(cfg)


def write_config(tmp_path: Path, **keys) -> Path:
    raw = {"base_model": str(ROOT / "examples/models/kimi-linear-48b-a3b.json"), "adapter": "lora",
           "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True, "sequence_len": 8192,
           "micro_batch_size": 2} | keys
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_plan_table_and_suggestions(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(write_config(tmp_path)), "--gpu-memory", "80GiB"],
                                env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "frozen weights, bf16" in result.output and "activations" in result.output
    assert "does not fit in 80.0 GiB" in result.output
    assert "load_in_4bit: true" in result.output


def test_cli_plan_json_with_overrides(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(write_config(tmp_path)), "--json", "--gpu-memory", "141GB",
                                      "--gradient-checkpointing", "--load-in-4bit", "--adapter", "qlora"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # stdout is the JSON alone (the overrides are echoed on stderr)
    assert out["fits"] and out["suggestions"] == []
    assert out["settings"]["gradient_checkpointing"] and out["settings"]["quantisation"] == "int4"
    assert out["peak_allocated_gib"] == pytest.approx(sum(i["gib"] for i in out["items"]))
    assert out["device_total_gib"] > out["peak_allocated_gib"]


def test_cli_plan_per_gpu_under_fsdp(tmp_path):
    one = json.loads(CliRunner().invoke(app, ["plan", str(write_config(tmp_path)), "--json"]).output)
    result = CliRunner().invoke(app, ["plan", str(write_config(tmp_path)), "--json", "--gpus", "2"])
    assert result.exit_code == 0, result.output
    two = json.loads(result.output)
    assert two["settings"]["gpus"] == 2 and two["peak_allocated_gib"] < one["peak_allocated_gib"]
    assert any(item["name"] == "gathered: decoder layers" for item in two["items"])
    table = CliRunner().invoke(app, ["plan", str(write_config(tmp_path)), "--gpus", "2"], env={"COLUMNS": "160"})
    assert "each of 2 GPUs (FSDP2)" in table.output
    refused = CliRunner().invoke(app, ["plan", str(write_config(tmp_path)), "--gpus", "0"])
    assert refused.exit_code != 0 and "gpus must be at least 1, got 0" in refused.output


def test_cli_plan_reports_a_bad_memory_size(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(write_config(tmp_path)), "--gpu-memory", "lots"])
    assert result.exit_code == 2 and "memory size" in result.output


def test_plan_builds_nothing_on_a_device():
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    predict_peak_memory(train_config(), widths_48b())
    assert (torch.cuda.memory_allocated() if torch.cuda.is_available() else 0) == before


# Measured peaks of benchmarks/train_multi_gpu.py on 2 GPUs (benchmarks/RESULTS.md, "Several GPUs": the 4-layer
# rows on 2 H200s, 2026-11-26; the 27-layer row on 2 H100s, 2026-11-25, before the weighted expert SwiGLU and the
# in-kernel KDA gate, which need less than its checkpointed step's peak):
# (layers, tokens per GPU, checkpointing, reshard_after_forward, GiB of the largest rank). Autocast, unpacked.
MEASURED_2_GPUS = [
    (4, 8192, False, True, 21.4),
    (4, 8192, False, False, 28.5),
    (4, 16384, False, True, 24.9),
    (4, 16384, False, False, 32.0),
    (27, 8192, True, True, 58.7),
]


@pytest.mark.parametrize("layers, seq, ckpt, reshard, measured", MEASURED_2_GPUS)
def test_plan_on_two_gpus_is_within_10_percent_of_the_measured_peaks(layers, seq, ckpt, reshard, measured):
    model = widths_48b() if layers == 4 else KimiLinearConfig.from_pretrained(
        ROOT / "examples/models/kimi-linear-48b-a3b.json")
    config = train_config(sequence_len=seq, gradient_checkpointing=ckpt, fsdp_version=2,
                          fsdp_config={"reshard_after_forward": reshard})
    plan = predict_peak_memory(config, model, autocast=True, packed=False, gpus=2)
    assert abs(plan.peak_allocated_gib / measured - 1) < 0.10, (plan.peak_allocated_gib, measured)


def test_fsdp_shards_parameters_but_not_quantised_buffers_and_offload_moves_them_to_the_host():
    cfg = widths_48b()

    def items(gpus, **keys):
        return {i.name: i.bytes for i in predict_peak_memory(train_config(**keys), cfg, gpus=gpus).items}

    one, two = items(1), items(2)
    assert two["frozen weights, bf16 (1/2)"] == one["frozen weights, bf16"] / 2
    assert two["AdamW states (1/2)"] == one["AdamW states"] / 2
    assert two["gathered: embeddings, lm_head"] > 0 and two["gathered: decoder layers"] > 0
    kept_all = items(2, fsdp_version=2, fsdp_config={"reshard_after_forward": False})
    assert kept_all["gathered: decoder layers"] > two["gathered: decoder layers"]
    quantised = items(2, load_in_8bit=True)
    assert quantised["frozen weights, int8"] == items(1, load_in_8bit=True)["frozen weights, int8"]
    assert quantised["gathered: decoder layers"] == 0  # only bf16 parameters are gathered
    offloaded = items(2, fsdp_version=2, fsdp_config={"offload_params": True})
    assert offloaded["frozen weights, bf16 (on the host)"] == 0
    with pytest.raises(ValueError, match="gpus"):
        predict_peak_memory(train_config(), cfg, gpus=0)


def test_a_model_too_big_for_one_gpu_is_told_to_use_more():
    full = KimiLinearConfig.from_pretrained(ROOT / "examples/models/kimi-linear-48b-a3b.json")
    config = train_config(sequence_len=8192, gradient_checkpointing=True)
    assert not predict_peak_memory(config, full).fits(80 * GIB)
    suggestions = suggest_settings(config, full, 80 * GIB)
    more_gpus = [s for s in suggestions if s.change == {"gpus": 2}]
    assert more_gpus and more_gpus[0].plan.fits(80 * GIB)
    assert more_gpus[0].text == "2 GPUs (torchrun --nproc_per_node 2)"
    assert not any(s.change.get("gpus") == 4 for s in suggestions)  # the smallest count that fits, once


def test_linears_that_read_one_tensor_are_read_off_the_forward():
    from kimitune.plan.dataflow import dataflow

    for cfg in (widths_48b(), replace(widths_48b(), q_lora_rank=768)):
        flow = dataflow(cfg)
        kda, mla = "model.layers.0.self_attn.", "model.layers.3.self_attn."
        assert flow.readers[kda + "q_proj"] == {kda + name for name in (
            "q_proj", "k_proj", "v_proj", "b_proj", "forget_gate.f_a_proj", "g_a_proj")}
        assert flow.readers[kda + "o_proj"] == {kda + "o_proj"}
        query = "q_proj" if cfg.q_lora_rank is None else "q_a_proj"
        assert flow.readers[mla + "kv_a_proj_with_mqa"] == {mla + query, mla + "kv_a_proj_with_mqa"}
        assert flow.readers[mla + "kv_b_proj"] == {mla + "kv_b_proj"}
        assert flow.readers["model.layers.0.mlp.up_proj"] == {"model.layers.0.mlp.gate_proj",
                                                               "model.layers.0.mlp.up_proj"}
        shared = "model.layers.1.mlp.shared_experts."
        assert flow.readers[shared + "gate_proj"] == {shared + "gate_proj", shared + "up_proj"}
        assert kda + "q_proj" in flow.block_readers and kda + "f_b_proj" not in flow.block_readers
        assert flow.rows_per_token["model.layers.1.mlp.experts"] == cfg.num_experts_per_token


def test_plan_shapes_are_the_meta_models():
    from kimitune.model.summary import summarize
    from kimitune.plan.shapes import model_shapes

    cfg = widths_48b()
    shapes, summary = model_shapes(train_config(), cfg), summarize(cfg)
    assert shapes.total_params == summary.total_params
    assert sum(p.numel for layer in shapes.layers for p in layer.projections) == summary.quantizable_params
    assert [layer.gradient_from for layer in shapes.layers] == ["attention", "input", "input", "input"]
    experts = model_shapes(train_config(lora_target_linear=False, lora_target_experts=True), cfg)
    assert [layer.gradient_from for layer in experts.layers] == ["nothing", "feed_forward", "input", "input"]
    assert all(a.copies == cfg.num_experts_per_token for a in experts.adapted)


def test_items_are_keyed_by_part():
    cfg = widths_48b()
    one = predict_peak_memory(train_config(), cfg)
    assert one.item(Part.FROZEN_BF16).name == "frozen weights, bf16"
    with pytest.raises(KeyError):
        one.item(Part.GATHERED_LAYERS)
    two = predict_peak_memory(train_config(), cfg, gpus=2)
    assert two.item(Part.OPTIMIZER).shards == 2 and two.item(Part.OPTIMIZER).name == "AdamW states (1/2)"
    assert [i["key"] for i in two.to_dict()["items"]][:2] == ["frozen_bf16", "lora_weights"]


def test_small_models_count_parameters_in_readable_units():
    cfg = KimiLinearConfig.from_pretrained(ROOT / "examples/models/tiny.json")
    lora = predict_peak_memory(train_config(), cfg)
    assert lora.item(Part.FROZEN_BF16).note == "1.35M params"
    assert lora.item(Part.LORA_WEIGHTS).note == "150.0K params, 43 modules"  # r = 16
    assert predict_peak_memory(train_config(adapter=None), cfg).item(Part.MASTER_WEIGHTS).note == "1.35M params"


def test_the_plan_table_fits_80_columns_and_counts_a_small_model_in_millions():
    result = CliRunner().invoke(app, ["plan", str(ROOT / "examples/quickstart.yaml")])
    assert result.exit_code == 0, result.output
    assert "1.35M params" in result.output and "0.00B" not in result.output  # the tiny model's 1,348,268
    assert max(len(line) for line in result.output.splitlines()) <= 80  # a log file's width (rich's default)


def test_layers_in_pieces_hold_one_piece_of_a_layer_and_what_passes_between_pieces():
    """sequence_piece_len: the rebuilt layer is counted for one piece (plus an MLA piece's keys over the whole row),
    the layer inputs and the KDA states and MLA latents for the whole row."""
    cfg = KimiLinearConfig.from_pretrained(ROOT / "examples/models/kimi-linear-48b-a3b.json")
    long = dict(gradient_checkpointing=True, sequence_len=262144, load_in_8bit=True)
    whole, pieces = (predict_peak_memory(train_config(**long, **extra), cfg)
                     for extra in ({}, {"sequence_piece_len": 16384}))
    items = lambda plan: {item.part: item.bytes for item in plan.items}  # noqa: E731
    assert items(pieces)[Part.CHECKPOINT_INPUTS] == items(whole)[Part.CHECKPOINT_INPUTS] == 27 * 2 * 2304 * 262144
    mla_layers = sum(1 for i in range(27) if not cfg.is_kda_layer(i))
    kda_cuts = (27 - mla_layers) * 15 * (4 * 32 * 128 * 128 + 2 * 3 * 4096 * 4)
    assert items(pieces)[Part.PIECE_STATES] == mla_layers * 2 * (512 + 64) * 262144 + kda_cuts
    assert Part.PIECE_STATES not in items(whole)
    assert items(pieces)[Part.REBUILT_LAYER] < items(whole)[Part.REBUILT_LAYER] / 4
    assert pieces.peak_allocated < whole.peak_allocated - 40 * GIB
    assert pieces.settings["sequence_piece_len"] == 16384
    # a piece as long as the row is the whole layer
    same = predict_peak_memory(train_config(**long, sequence_piece_len=262144), cfg)
    assert same.peak_allocated == whole.peak_allocated


def test_tiled_mlp_counts_one_shard_of_a_feed_forward_block():
    """tiled_mlp: a layer keeps its feed-forward block's input only, and the backward rebuilds one shard of the
    block at a time (its kept terms, its forward working set), recomputed layers or not, in pieces or not."""
    cfg = widths_48b()
    b, C = 2, 2304
    moe = cfg.num_experts_per_token * b * (C + 3 * cfg.moe_intermediate_size)  # one routed copy's working set
    for keys in ({}, {"gradient_checkpointing": True}, {"gradient_checkpointing": True, "sequence_len": 16384},
                 {"gradient_checkpointing": True, "sequence_len": 16384, "sequence_piece_len": 4096}):
        whole = predict_peak_memory(train_config(**keys), cfg)
        tiled = predict_peak_memory(train_config(tiled_mlp=True, **keys), cfg)
        two, four = (predict_peak_memory(train_config(tiled_mlp=True, tiled_mlp_num_shards=n, **keys), cfg)
                     for n in (2, 4))
        tokens = min(keys.get("sequence_piece_len", 4096), keys.get("sequence_len", 4096))
        # Axolotl's default: shards of about hidden_size tokens; the MoE working set of the rest is gone
        assert whole.peak_allocated - tiled.peak_allocated > moe * (tokens - C), keys
        assert four.peak_allocated < two.peak_allocated < whole.peak_allocated, keys
        assert tiled.settings["tiled_mlp"] and not whole.settings["tiled_mlp"]
    # a run that misses by less than what tiling saves is told to tile
    train = train_config(gradient_checkpointing=True, sequence_len=16384)
    between = (predict_peak_memory(train, cfg).device_total
               + predict_peak_memory(train_config(gradient_checkpointing=True, sequence_len=16384, tiled_mlp=True),
                                     cfg).device_total) / 2
    assert {"tiled_mlp": True} in [s.change for s in suggest_settings(train, cfg, between)]


def test_a_long_row_that_does_not_fit_is_told_to_run_in_pieces():
    """On an H200-sized GPU (130 GiB): the 48B in 8-bit at 262,144 tokens fits only in pieces; the longest piece
    tried (65,536: longer ones gain little speed) that fits is named."""
    cfg = KimiLinearConfig.from_pretrained(ROOT / "examples/models/kimi-linear-48b-a3b.json")
    train = train_config(gradient_checkpointing=True, sequence_len=262144, load_in_8bit=True)
    assert not predict_peak_memory(train, cfg).fits(130 * GIB)
    pieced = [s for s in suggest_settings(train, cfg, 130 * GIB) if "sequence_piece_len" in s.change]
    assert pieced[0].plan.fits(130 * GIB) and pieced[0].change["sequence_piece_len"] == 65536
    assert predict_peak_memory(train.model_copy(update={"sequence_piece_len": 131072}), cfg).fits(130 * GIB)


def test_offloaded_activations_wait_on_the_host_and_come_back_one_layer_at_a_time():
    cfg = KimiLinearConfig.from_pretrained(ROOT / "examples/models/kimi-linear-48b-a3b.json")
    long = dict(gradient_checkpointing=True, sequence_len=262144, load_in_8bit=True, sequence_piece_len=16384)
    kept, offloaded = (predict_peak_memory(train_config(**long, activation_offloading=offload), cfg)
                       for offload in (False, True))
    on_host = {item.part for item in offloaded.items if item.on_host}
    assert on_host == {Part.CHECKPOINT_INPUTS, Part.PIECE_STATES}
    moved = sum(item.bytes for item in kept.items if item.part in on_host)
    back = next(item.bytes for item in offloaded.items if item.part is Part.BROUGHT_BACK)
    assert back == pytest.approx(moved / 27)
    assert offloaded.peak_allocated == pytest.approx(kept.peak_allocated - moved + back)
    # what an 80 GB card needs at this length: pieces and offloading
    train = train_config(gradient_checkpointing=True, sequence_len=262144, load_in_8bit=True)
    pieced = [s for s in suggest_settings(train, cfg, 80 * GIB) if "sequence_piece_len" in s.change]
    assert pieced[0].change.get("activation_offloading") is True and pieced[0].plan.fits(80 * GIB)


def test_segments_keep_one_input_per_segment_and_rebuild_one_segment():
    cfg = KimiLinearConfig.from_pretrained(ROOT / "examples/models/kimi-linear-48b-a3b.json")
    long = dict(gradient_checkpointing=True, sequence_len=1048576, load_in_4bit=True, adapter="qlora",
                sequence_piece_len=16384)
    plans = {k: predict_peak_memory(train_config(**long, recompute_segment_layers=k), cfg) for k in (1, 4)}
    items = {k: {item.part: item.bytes for item in plan.items} for k, plan in plans.items()}
    row = 2 * 2304 * 1048576
    assert items[1][Part.CHECKPOINT_INPUTS] == 27 * row and Part.SEGMENT_INPUTS not in items[1]
    assert items[4][Part.CHECKPOINT_INPUTS] == 7 * row and items[4][Part.SEGMENT_INPUTS] == 3 * row
    assert items[4][Part.PIECE_STATES] < items[1][Part.PIECE_STATES]
    # offloaded, the kept inputs go to the host; the segment being rebuilt is on the GPU
    offloaded = predict_peak_memory(train_config(**long, recompute_segment_layers=4, activation_offloading=True), cfg)
    on_host = {item.part for item in offloaded.items if item.on_host}
    assert Part.CHECKPOINT_INPUTS in on_host and Part.SEGMENT_INPUTS not in on_host
    with pytest.raises(Exception, match="recompute_segment_layers needs every decoder layer recomputed"):
        train_config(sequence_len=4096, recompute_segment_layers=2)
    # a million tokens on an H200-sized GPU: the plan's way there (the host memory it takes is not checked)
    train = train_config(gradient_checkpointing=True, sequence_len=1048576, load_in_4bit=True, adapter="qlora")
    found = next(s for s in suggest_settings(train, cfg, 139 * GIB) if "sequence_piece_len" in s.change)
    assert found.change["activation_offloading"] is True and found.plan.fits(139 * GIB)
    # segments are the next tier: on a GPU where offloading alone does not fit
    tight = predict_peak_memory(train.model_copy(update=found.change), cfg).device_total - GIB
    segmented = next(s for s in suggest_settings(train, cfg, tight) if "sequence_piece_len" in s.change)
    assert segmented.change.get("recompute_segment_layers", 1) > 1 or \
        segmented.change["sequence_piece_len"] < found.change["sequence_piece_len"]


def test_offloading_is_held_to_the_hosts_memory_when_given(tmp_path):
    """--host-memory: a million-token row's layer inputs (121.5 GiB) do not fit 128 GiB of host memory beside the
    rest; segments of layers keep few enough inputs that they do."""
    cfg = KimiLinearConfig.from_pretrained(ROOT / "examples/models/kimi-linear-48b-a3b.json")
    train = train_config(gradient_checkpointing=True, sequence_len=1048576, load_in_4bit=True, adapter="qlora",
                         sequence_piece_len=16384, activation_offloading=True)
    plan = predict_peak_memory(train, cfg)
    assert plan.host_total == sum(i.host_bytes for i in plan.items if i.on_host) and plan.host_total > 120 * GIB
    assert plan.fits(139 * GIB) and not plan.fits(139 * GIB, 100 * GIB)
    suggestions = suggest_settings(train, cfg, 139 * GIB, host_bytes=100 * GIB)
    pieced = next(s for s in suggestions if "sequence_piece_len" in s.change or "recompute_segment_layers" in s.change)
    assert pieced.plan.fits(139 * GIB, 100 * GIB) and pieced.change.get("recompute_segment_layers", 1) > 1


def test_context_parallelism_splits_the_rows_tokens_and_shards_over_the_data_ranks():
    """context_parallel_size 2 on 4 GPUs: each GPU computes half of a row's tokens, FSDP2 shards over the 2 data
    ranks, and the MLA layers that keep their activations hold the whole row's latents; 2 on 3 GPUs is refused."""
    cfg = widths_48b()
    long = dict(sequence_len=65536)
    alone = predict_peak_memory(train_config(**long), cfg, gpus=2)
    split = predict_peak_memory(train_config(**long, context_parallel_size=2), cfg, gpus=4)
    assert split.settings["tokens"] == 32768 and split.settings["context_parallel_size"] == 2
    assert split.item(Part.OPTIMIZER).shards == 2 == alone.item(Part.OPTIMIZER).shards
    mla_layers = sum(1 for i in range(cfg.num_hidden_layers) if not cfg.is_kda_layer(i))
    assert split.item(Part.GATHERED_LATENTS).bytes == mla_layers * 65536 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    assert split.peak_allocated < alone.peak_allocated
    with pytest.raises(ValueError, match="does not divide 3 GPUs"):
        predict_peak_memory(train_config(**long, context_parallel_size=2), cfg, gpus=3)


def test_a_long_row_that_does_not_fit_is_suggested_split_across_the_gpus():
    """262,144 tokens of the 48B in 8-bit on 4 GPUs of 80 GiB: the plan suggests splitting the row over the 4 GPUs
    (and over 8), each suggestion planned and fitting."""
    cfg = KimiLinearConfig.from_pretrained(ROOT / "examples/models/kimi-linear-48b-a3b.json")
    train = train_config(sequence_len=262144, gradient_checkpointing=True, load_in_8bit=True)
    assert not predict_peak_memory(train, cfg, gpus=4).fits(80 * 2**30)
    found = {s.text: s for s in suggest_settings(train, cfg, 80 * 2**30, gpus=4)}
    assert "context_parallel_size: 4" in found
    assert "8 GPUs (torchrun --nproc_per_node 8), context_parallel_size: 8" in found
    assert found["context_parallel_size: 4"].plan.settings["tokens"] == 65536
    assert all(s.plan.fits(80 * 2**30) for s in found.values())
