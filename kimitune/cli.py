"""The `kimitune` command line: train, preprocess, inspect, plan, config, and the inference commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console

from kimitune.config import ConfigError, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune Moonshot AI's Kimi Linear models from a chat dataset and a YAML file.",
)
console = Console(quiet=os.environ.get("RANK", "0") != "0")  # under torchrun only rank 0 prints
# Warnings and errors go to stderr, so that `--json` output and `generate`'s stdout stay machine-readable.
diagnostics = Console(stderr=True, quiet=os.environ.get("RANK", "0") != "0")

OVERRIDE_HELP = (
    "Any config key can be overridden after CONFIG as --key value (dashes or underscores), "
    "e.g. --learning-rate 1e-4 --max-steps 20; a key given without a value is set to true."
)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """['--learning-rate', '1e-4', '--sample-packing', '--seed=3'] -> {'learning-rate': 1e-4, ...}.

    Values are read as YAML scalars, so numbers, booleans and null come out typed.
    """
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        overrides[key] = yaml.safe_load(value) if value != "" else None
        i += 1
    return overrides


def _load(config: Path, extra: list[str]):
    from kimitune.config_keys import yaml_scalar

    try:
        overrides = parse_overrides(extra)
        cfg, warnings = load_config(config, overrides)
    except ConfigError as err:
        diagnostics.print(f"[red]error:[/] {err}", soft_wrap=True)
        raise typer.Exit(2) from None
    if overrides:  # the run's log then says what differs from the YAML file
        given = ", ".join(f"{key.replace('-', '_')}: {yaml_scalar(value)}" for key, value in overrides.items())
        diagnostics.print(f"overrides from the command line: {given}", highlight=False, soft_wrap=True)
    for warning in warnings:
        diagnostics.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    return cfg


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    help="Train (LoRA or full fine-tuning) as CONFIG describes. An output_dir that holds a run is refused unless "
    "--resume-from-checkpoint continues it (from its latest checkpoint) or --overwrite-output-dir starts over "
    f"(deleting its files); one run per output_dir at a time. {OVERRIDE_HELP}",
)
def train(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The YAML config file.", exists=False),
) -> None:
    from kimitune.train.trainer import Trainer, TrainingDiverged

    cfg = _load(config, ctx.args)
    try:
        summary = Trainer(cfg, console).train()
    except (ConfigError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True)  # unwrapped: paths stay whole
        raise typer.Exit(2) from None
    except TrainingDiverged as err:
        console.print(f"[red]stopped:[/] {err}", soft_wrap=True)
        raise typer.Exit(3) from None
    _print_summary(summary)


def _print_summary(summary) -> None:
    def fmt(loss):
        return "-" if loss is None else f"{loss:.4f}"

    console.print(
        f"\n[bold green]done[/]: {summary.steps} steps ({summary.skipped_steps} skipped), "
        f"{summary.tokens:,} tokens in {summary.seconds:.1f} s "
        f"({summary.tokens / max(summary.seconds, 1e-9):,.0f} tokens/s)\n"
        f"eval loss: first {fmt(summary.first_eval_loss)}, final {fmt(summary.final_eval_loss)}, "
        f"best {fmt(summary.best_eval_loss)}\n"
        f"saved to {summary.saved}; metrics in {summary.output_dir / 'metrics.jsonl'}"
        + (f"; loss curve {summary.loss_curve}" if summary.loss_curve else ""),
        soft_wrap=True,  # paths stay whole
    )


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    help=f"Tokenise and cache the datasets of CONFIG, and print the data report. {OVERRIDE_HELP}",
)
def preprocess(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The YAML config file."),
) -> None:
    from kimitune.data import load_tokenizer, prepare_datasets

    cfg = _load(config, ctx.args)
    try:
        tokenizer = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code)
        prepared = prepare_datasets(cfg, tokenizer)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True)  # unwrapped: paths stay whole
        raise typer.Exit(2) from None
    console.print(prepared.report)


@app.command(help="Print a model's layer pattern, parameter counts and weight memory (bf16, 8-bit, 4-bit).")
def inspect(
    model: str = typer.Argument(..., help="A model folder, a config.json, or a preset name (tiny, kimi-linear-48b-a3b)."),
) -> None:
    from kimitune.model.configuration import PRESETS
    from kimitune.model.summary import summarize

    try:
        console.print(summarize(model))
    except FileNotFoundError as err:
        _fail(FileNotFoundError(f"{err}: give a model folder, a config.json or a preset name "
                                f"({', '.join(sorted(PRESETS))})"))
    except ValueError as err:
        _fail(err)


config_app = typer.Typer(no_args_is_help=True, help="The config keys, and what a config file resolves to.")
app.add_typer(config_app, name="config")


@config_app.command("keys", help="List every config key with its type, default and meaning (read from the schema "
                    "that validates configs), then the Axolotl keys accepted without effect.")
def config_keys_command(
    pattern: str | None = typer.Argument(None, help="Only the keys whose name contains this (dashes or "
                                         "underscores)."),
) -> None:
    from kimitune.config_keys import config_keys, render_keys

    keys = config_keys()
    if pattern is not None:
        keys = [key for key in keys if pattern.replace("-", "_") in key.name]
        if not keys:
            _fail(ValueError(f"no config key contains {pattern!r}: `kimitune config keys` lists them all"))
    typer.echo(render_keys(keys, inert=pattern is None))


@config_app.command(
    "show",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    help=f"Print CONFIG as training reads it (YAML): every key, defaults filled in, overrides applied. {OVERRIDE_HELP}",
)
def config_show_command(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The YAML config file."),
) -> None:
    from kimitune.config_keys import resolved_config

    cfg = _load(config, ctx.args)
    typer.echo(yaml.safe_dump(resolved_config(cfg), sort_keys=False, allow_unicode=True, width=100), nl=False)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    help="Predict the peak GPU memory of training CONFIG (no weights are loaded) and, when it does not fit "
    f"--gpu-memory, the settings that would make it fit. {OVERRIDE_HELP}",
)
def plan(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The YAML config file."),
    gpu_memory: str = typer.Option("80GiB", help="The GPU's memory: 80GiB (H100), 141GB (H200), 24GiB, ..."),
    json_output: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    gpus: int = typer.Option(1, help="GPUs the run uses (torchrun --nproc_per_node): above 1, the memory of one "
                             "GPU under FSDP2 as fsdp_config says."),
    host_memory: str = typer.Option(None, help="The host memory what is offloaded may take (activation_offloading, "
                                    "fsdp_config.offload_params), per GPU's process: unset, not checked."),
) -> None:
    from kimitune.plan import load_model_config, parse_memory, plan_json, predict_peak_memory, suggest_settings

    cfg = _load(config, ctx.args)
    try:
        gpu = parse_memory(gpu_memory)
        host = None if host_memory is None else parse_memory(host_memory)
        model_config = load_model_config(cfg)
        memory = predict_peak_memory(cfg, model_config, gpus=gpus)
        suggestions = [] if memory.fits(gpu, host) else suggest_settings(cfg, model_config, gpu, gpus=gpus,
                                                                          host_bytes=host)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        _fail(err)
    if json_output:
        typer.echo(plan_json(memory, gpu, suggestions, host))
        return
    _print_plan(memory, gpu, suggestions, host)


def _print_plan(memory, gpu: float, suggestions, host: float | None = None) -> None:
    from rich.table import Table

    gib = 2**30
    per_gpu = memory.settings["gpus"]
    table = Table(title=f"predicted peak GPU memory: {memory.tokens:,} tokens per micro-batch"
                  + (f", each of {per_gpu} GPUs (FSDP2)" if per_gpu > 1 else ""))
    table.add_column("part")
    table.add_column("GiB", justify="right")
    table.add_column("note", style="dim")
    for item in memory.items:
        table.add_row(item.name, f"{item.bytes / gib:.2f}", item.note)
    table.add_row("[bold]peak allocated[/]", f"[bold]{memory.peak_allocated_gib:.2f}[/]",
                  "torch.cuda.max_memory_allocated")
    table.add_row("[bold]device total[/]", f"[bold]{memory.device_total_gib:.2f}[/]",
                  "+ allocator overhead and CUDA context")
    if memory.host_total:
        table.add_row("[bold]pinned host memory[/]", f"[bold]{memory.host_total / gib:.2f}[/]", "what is offloaded")
    console.print(table)
    fits = memory.fits(gpu, host)
    verdict = "[green]fits[/]" if fits else "[red]does not fit[/]"
    within = f" and {host / gib:.1f} GiB of host memory" if host is not None else ""
    console.print(f"{verdict} in {gpu / gib:.1f} GiB{within}", highlight=False)
    if fits:
        return
    if not suggestions:
        console.print("nothing tried fits: use more GPUs (FSDP2 through torchrun), a GPU with more memory, or a "
                      "smaller model", highlight=False)
        return
    hints = Table(title="settings that would make it fit", show_header=True)
    hints.add_column("change")
    hints.add_column("device total GiB", justify="right")
    for suggestion in suggestions:
        hints.add_row(suggestion.text, f"{suggestion.plan.device_total_gib:.2f}")
    console.print(hints)


# ----- inference and export (issue 6): thin wrappers over kimitune.infer -----

SAMPLING_HELP = {
    "temperature": "0 = greedy (the default); else the logits are divided by it before sampling.",
    "top_p": "Sample from the smallest set of most likely tokens whose probability reaches top_p (1 = off).",
    "top_k": "Sample from the k most likely tokens (0 = off).",
    "max_new_tokens": "The most tokens generated per reply.",
    "repetition_penalty": "Penalty on tokens already in the sequence (1 = off; 1.1 is mild).",
    "seed": "Seed of the draws (each prompt has its own stream).",
}
DEVICE_HELP = "auto (a GPU when there is one), cpu or cuda; bfloat16 on a GPU, float32 on the CPU."


def _fail(err: Exception) -> None:
    diagnostics.print(f"[red]error:[/] {err}", soft_wrap=True)  # unwrapped: paths stay whole
    raise typer.Exit(2) from None


def _sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int, repetition_penalty: float,
              seed: int):
    from kimitune.infer import SamplingSettings

    return SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                            repetition_penalty=repetition_penalty, seed=seed)


def _model_and_tokenizer(model, adapter, tokenizer, config, device, trust_remote_code):
    from kimitune.infer import load_inference_tokenizer, load_model, pick_device, resolve_sources

    sources = resolve_sources(model, adapter, tokenizer, config, trust_remote_code)
    tok = load_inference_tokenizer(sources)
    loaded = load_model(sources, pick_device(device))
    console.print(f"model {sources.model}" + (f" + adapter {sources.adapter}" if sources.adapter else "")
                  + f" on {loaded.lm_head.weight.device}", highlight=False)
    return loaded, tok


@app.command(help="Generate a reply to every prompt of a JSONL file (lines {\"messages\": [...]} or "
             "{\"prompt\": \"...\"}) and write them as JSONL, in batches.")
def generate(
    input_file: Path = typer.Option(..., "--input", "-i", help="JSONL file of prompts."),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL file to write."),
    model: Path | None = typer.Option(None, help="Model folder (release layout)."),
    adapter: Path | None = typer.Option(None, help="LoRA adapter folder (PEFT format)."),
    tokenizer: str | None = typer.Option(None, help="Tokenizer folder; default: the adapter's or the model's."),
    config: Path | None = typer.Option(None, help="Take model, adapter and tokenizer from a training config."),
    batch_size: int = typer.Option(8, min=1, help="Prompts generated together."),
    temperature: float = typer.Option(0.0, help=SAMPLING_HELP["temperature"]),
    top_p: float = typer.Option(1.0, help=SAMPLING_HELP["top_p"]),
    top_k: int = typer.Option(0, help=SAMPLING_HELP["top_k"]),
    max_new_tokens: int = typer.Option(256, help=SAMPLING_HELP["max_new_tokens"]),
    repetition_penalty: float = typer.Option(1.0, help=SAMPLING_HELP["repetition_penalty"]),
    seed: int = typer.Option(0, help=SAMPLING_HELP["seed"]),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    trust_remote_code: bool = typer.Option(False, help="Let the tokenizer's own code run (the Kimi release's)."),
) -> None:
    from kimitune.infer import generate_file, read_prompts

    try:
        settings = _sampling(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
        read_prompts(input_file)  # bad lines are reported before the model loads
        cfg = _load(config, []) if config is not None else None
        loaded, tok = _model_and_tokenizer(model, adapter, tokenizer, cfg, device, trust_remote_code)
        count = generate_file(loaded, tok, input_file, output, settings, batch_size,
                              on_batch=lambda done, total: console.print(f"{done}/{total} prompts"))
    except (FileNotFoundError, ValueError) as err:
        _fail(err)
    console.print(f"wrote {count} replies to {output}", highlight=False)


@app.command(help="Chat with a model in the terminal: streamed replies, /help lists the commands and how to type "
             "a message of several lines, /reset starts over, /exit quits.")
def chat(
    model: Path | None = typer.Option(None, help="Model folder (release layout)."),
    adapter: Path | None = typer.Option(None, help="LoRA adapter folder (PEFT format)."),
    tokenizer: str | None = typer.Option(None, help="Tokenizer folder; default: the adapter's or the model's."),
    config: Path | None = typer.Option(None, help="Take model, adapter and tokenizer from a training config."),
    system: str | None = typer.Option(None, help="A system prompt for the conversation."),
    temperature: float = typer.Option(0.0, help=SAMPLING_HELP["temperature"]),
    top_p: float = typer.Option(1.0, help=SAMPLING_HELP["top_p"]),
    top_k: int = typer.Option(0, help=SAMPLING_HELP["top_k"]),
    max_new_tokens: int = typer.Option(512, help=SAMPLING_HELP["max_new_tokens"]),
    repetition_penalty: float = typer.Option(1.0, help=SAMPLING_HELP["repetition_penalty"]),
    seed: int = typer.Option(0, help=SAMPLING_HELP["seed"]),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    trust_remote_code: bool = typer.Option(False, help="Let the tokenizer's own code run (the Kimi release's)."),
) -> None:
    from kimitune.infer import ChatSession, run_chat

    def read_line(prompt: str) -> str | None:
        try:
            return input(prompt)
        except EOFError:
            return None

    try:
        settings = _sampling(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
        cfg = _load(config, []) if config is not None else None
        loaded, tok = _model_and_tokenizer(model, adapter, tokenizer, cfg, device, trust_remote_code)
        run_chat(ChatSession(loaded, tok, settings, system), read_line, lambda text: typer.echo(text, nl=False))
    except (FileNotFoundError, ValueError) as err:
        _fail(err)


@app.command(
    "eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    help="Loss, perplexity and exact match of the assistant replies on CONFIG's eval split (test_datasets or "
    f"val_set_size). The model is the one training wrote to output_dir unless --model is given. {OVERRIDE_HELP}",
)
def eval_command(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The YAML config file."),
    model: Path | None = typer.Option(None, help="Model folder; default: the trained one (output_dir)."),
    adapter: Path | None = typer.Option(None, help="LoRA adapter folder (PEFT format)."),
    tokenizer: str | None = typer.Option(None, help="Tokenizer folder; default: the one training used."),
    output: Path | None = typer.Option(None, help="Also write the metrics and every reply as JSON."),
    batch_size: int = typer.Option(8, min=1, help="Replies generated together."),
    limit: int | None = typer.Option(None, min=1, help="Evaluate only the first N eval samples."),
    exact_match: bool = typer.Option(True, help="Generate the replies and score exact match."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    import json

    from rich.table import Table

    from kimitune.data import prepare_datasets
    from kimitune.infer import evaluate

    cfg = _load(config, ctx.args)
    try:
        loaded, tok = _model_and_tokenizer(model, adapter, tokenizer, cfg, device, False)
        if cfg.rl is not None:
            prepared = prepare_datasets(cfg, tok, progress=False)
            result = _evaluate_preference(cfg, loaded, prepared.eval, (prepared.desirable or {}).get("eval"), limit)
        else:
            samples = prepare_datasets(cfg, tok, progress=False).eval[:limit]
            report = evaluate(loaded, tok, cfg, samples, batch_size, with_exact_match=exact_match)
    except (FileNotFoundError, ValueError) as err:
        _fail(err)
    if cfg.rl is not None:
        table = Table(title=f"eval ({cfg.rl})", show_header=True)
        unit, third = ("samples", "kl") if cfg.rl == "kto" else ("pairs", "reward accuracy")
        for column in (unit, "loss", third, "margin", "chosen", "rejected"):
            table.add_column(column, justify="right")
        shown = f"{result['kl']:.4f}" if cfg.rl == "kto" else f"{result['rewards/accuracies']:.1%}"
        table.add_row(str(result[unit]), f"{result['loss']:.4f}", shown,
                      *(f"{result[f'rewards/{name}']:.4f}" if f"rewards/{name}" in result else "-"
                        for name in ("margins", "chosen", "rejected")))
        console.print(table)
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result, indent=2) + "\n")
            console.print(f"wrote {output}", highlight=False)
        return
    table = Table(title="eval", show_header=True)
    for column in ("samples", "label tokens", "loss", "perplexity", "replies", "exact match"):
        table.add_column(column, justify="right")
    accuracy = "-"
    if report.exact_match is not None:
        accuracy = f"{report.exact_matches}/{report.replies} ({report.exact_match:.1%})"
    table.add_row(str(report.samples), f"{report.label_tokens:,}", f"{report.loss:.4f}", f"{report.perplexity:.3f}",
                  str(report.replies), accuracy)
    console.print(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
        console.print(f"wrote {output}", highlight=False)


def _evaluate_preference(cfg, model, eval_samples: list, desirable: list[bool] | None, limit: int | None) -> dict:
    """A preference config's eval pairs (KTO: samples) under ``model``: the loss and the rewards' means. DPO, IPO and
    KTO compare with the run's reference (output_dir's reference_logps.pt, written before its first step)."""
    import torch

    from kimitune.data.preference import make_example_batches, preference_examples
    from kimitune.train.preference import evaluate_pairs, figures, objective_for, preference_settings
    from kimitune.train.trainer import REFERENCE_FILE

    settings = preference_settings(cfg)
    unit = "samples" if settings.unpaired else "pairs"
    pairs = preference_examples(eval_samples, desirable, cfg.sequence_len)
    if not pairs:
        raise ValueError(f"the config has no eval {unit}: set test_datasets or val_set_size")
    pairs = pairs[:limit]
    reference = None
    if settings.uses_reference:
        path = Path(cfg.output_dir) / REFERENCE_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: {cfg.rl} is scored against the reference log-probabilities "
                                    "its training run wrote there (train with this config first)")
        reference = torch.load(path)["eval"]
        if reference.shape[0] < len(pairs):
            raise ValueError(f"{path} holds {reference.shape[0]} eval {unit}, the config's data {len(pairs)}: "
                             "evaluate with the data the run trained with")
        reference = reference[: len(pairs)]
    device = model.lm_head.weight.device
    batches = make_example_batches(pairs, cfg.micro_batch_size * cfg.sequence_len, cfg.seed, 0,
                                   shared_prompts=cfg.rl_shared_prompt)
    objective = objective_for(settings, reference)
    values = evaluate_pairs(model, batches, objective, objective.denominator(batches), device)
    return {unit: len(pairs)} | figures(values, objective, prefix="")


@app.command("merge-lora", help="Merge a LoRA adapter into its base model shard by shard and write the release "
             "layout (config, index, tokenizer files) that transformers and vLLM load.")
def merge_lora_command(
    base: Path = typer.Option(..., help="The base model folder (release layout)."),
    adapter: Path = typer.Option(..., help="The LoRA adapter folder (PEFT format)."),
    out: Path = typer.Option(..., help="A new (or empty) folder for the merged model."),
) -> None:
    from kimitune.infer import merge_lora_checkpoint

    try:
        report = merge_lora_checkpoint(base, adapter, out)
    except (FileNotFoundError, ValueError) as err:
        _fail(err)
    console.print(f"merged {report.merged_tensors} tensors; wrote {len(report.shards)} shard(s), "
                  f"{report.total_bytes / 2**20:,.1f} MiB, to {report.out_dir}", highlight=False)


def main() -> None:
    app(prog_name="kimitune")


if __name__ == "__main__":
    sys.exit(main())
