"""Every kimitune command the README shows works as written: each command name and flag exists (also those of the
torchrun lines and the commands quoted in the text), and the workflow runs through the CLI, in the README's order,
on local stand-ins for what this machine cannot have (as tests/train/test_axolotl_example.py does):
examples/kimi-48b-lora.yaml as written but for a saved tiny model instead of the 48B hub id, the shipped tokenizer
and 60 of the quickstart conversations instead of the hub dataset; BASE is that tiny model, and a few steps replace
50. The quickstart trains 2 steps on a slice of its data (tests/train/test_quickstart.py runs it whole).
The torchrun lines run `kimitune train` in several processes; tests/train/test_distributed.py runs that."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from kimitune import KimiLinearConfig, KimiLinearForCausalLM
from kimitune.cli import app
from kimitune.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[tuple[str, list[str]]]:
    """(README line, the arguments after `kimitune`) for every kimitune command in the README's bash blocks and in
    its inline code, in the order they appear."""
    found = []
    for block in re.finditer(r"```bash\n(.*?)```", README, re.S):
        for line in block[1].splitlines():
            for part in line.split(" # ")[0].split("&&"):
                words = shlex.split(part)
                if "kimitune" in words:
                    found.append((line.strip(), words[words.index("kimitune") + 1 :]))
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    for span in re.finditer(r"`(kimitune [^`]+)`", prose):
        words = span[1].split()
        found.append((" ".join(words), words[1:]))
    return found


def resolve(args: list[str]):
    """(the command's name words, the (click) command, the arguments after them)."""
    command, names = typer.main.get_command(app), []
    while hasattr(command, "commands"):  # a group (typer bundles its own click: no isinstance on click's classes)
        name = args[0]
        sub = command.commands.get(name)
        assert sub is not None, f"kimitune has no command {' '.join(names + [name])!r}"
        command, names, args = sub, names + [name], args[1:]
    return names, command, args


@pytest.mark.parametrize("line, args", readme_commands(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_command_and_flag_in_the_readme_exists(line, args):
    names, command, rest = resolve(args)
    options = {opt for param in command.params for opt in param.opts}
    for flag in (word.split("=")[0] for word in rest if word.startswith("--")):
        if flag in options:
            continue
        # The commands that take a config read any other --key as a config key.
        assert command.context_settings.get("allow_extra_args"), f"{line}: `kimitune {' '.join(names)}` has no {flag}"
        assert flag[2:].replace("-", "_") in TrainConfig.model_fields, f"{line}: {flag} is no config key"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    """The README's placeholders and example paths -> local stand-ins."""
    tmp = tmp_path_factory.mktemp("readme")
    base = tmp / "tiny-base"
    KimiLinearForCausalLM(KimiLinearConfig.from_pretrained(ROOT / "examples/models/tiny.json")).save_pretrained(base)
    for file in (ROOT / "examples/tokenizer").iterdir():
        (base / file.name).write_bytes(file.read_bytes())
    rows = (ROOT / "examples/data/quickstart_train.jsonl").read_text().splitlines()
    data, eval_data = tmp / "chats.jsonl", tmp / "eval.jsonl"
    data.write_text("\n".join(rows[:60]) + "\n")
    eval_data.write_text("\n".join(rows[60:68]) + "\n")
    lora = yaml.safe_load((ROOT / "examples/kimi-48b-lora.yaml").read_text())
    lora |= {"base_model": str(base), "tokenizer": str(ROOT / "examples/tokenizer"), "trust_remote_code": False,
             "datasets": [{**lora["datasets"][0], "path": str(data)}], "dataset_prepared_path": str(tmp / "prepared"),
             "output_dir": str(tmp / "lora-out"), "sequence_len": 256}
    (tmp / "lora.yaml").write_text(yaml.safe_dump(lora))
    quickstart = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    quickstart |= {"output_dir": str(tmp / "quickstart"), "dataset_prepared_path": str(tmp / "prepared"),
                   "max_steps": 2}
    for key in ("init_from_config", "tokenizer"):
        quickstart[key] = str(ROOT / quickstart[key])
    quickstart["datasets"] = [{**quickstart["datasets"][0], "path": str(data)}]
    quickstart["test_datasets"] = [{**quickstart["test_datasets"][0], "path": str(eval_data)}]
    (tmp / "quickstart.yaml").write_text(yaml.safe_dump(quickstart))
    dpo = yaml.safe_load((ROOT / "examples/dpo_quickstart.yaml").read_text())
    dpo |= {"output_dir": str(tmp / "dpo"), "dataset_prepared_path": str(tmp / "prepared"), "max_steps": 2}
    for key in ("init_from_config", "tokenizer"):
        dpo[key] = str(ROOT / dpo[key])
    for entries in ("datasets", "test_datasets"):
        dpo[entries] = [{**entry, "path": str(ROOT / entry["path"])} for entry in dpo[entries]]
    (tmp / "dpo_quickstart.yaml").write_text(yaml.safe_dump(dpo))
    return {"examples/kimi-48b-lora.yaml": str(tmp / "lora.yaml"), "CONFIG": str(tmp / "lora.yaml"),
            "examples/quickstart.yaml": str(tmp / "quickstart.yaml"), "BASE": str(base),
            "examples/dpo_quickstart.yaml": str(tmp / "dpo_quickstart.yaml"),
            "outputs/lora-out": str(tmp / "lora-out"), "merged": str(tmp / "merged"), "N": "2"}


def tiny(args: list[str], stand_ins: dict[str, str]) -> list[str]:
    """The README's arguments with stand-ins, and the few steps and tokens that keep a CPU run short."""
    args = [stand_ins.get(word, word) for word in args]
    if args[0] == "train":
        # The stand-in data makes 4 steps an epoch and the example saves once an epoch: 6 steps leave checkpoint-4.
        if "--max-steps" in args:
            args[args.index("--max-steps") + 1] = "6"
        elif "--resume-from-checkpoint" in args:
            args += ["--max-steps", "8"]
        elif "--overwrite-output-dir" in args:
            args += ["--max-steps", "2"]
    if args[0] == "eval":
        args += ["--limit", "2", "--device", "cpu"]
    if args[0] == "chat":
        args += ["--max-new-tokens", "3", "--device", "cpu"]
    return args


EXPECTED_OUTPUT = {
    "train": "done: ", "plan": "fits in", "preprocess": "train samples:", "eval": "perplexity",
    "chat": "assistant: ", "merge-lora": "merged ", "config keys": "learning_rate: float",
    "config show": "lr_scheduler: ",
    "inspect": "total parameters",
}


@pytest.mark.slow
def test_the_readme_workflow_runs_through_the_cli(stand_ins):
    pytest.importorskip("bitsandbytes")  # the example loads its base in 8-bit
    ran = set()
    for line, args in readme_commands():
        names, _, _ = resolve(args)
        if line.startswith("torchrun"):
            continue
        result = CliRunner().invoke(app, tiny(args, stand_ins), input="hi\n/exit\n", env={"COLUMNS": "80"})
        assert result.exit_code == 0, f"{line}\n{result.output}"
        assert EXPECTED_OUTPUT[" ".join(names)] in result.output, f"{line}\n{result.output}"
        if "--resume-from-checkpoint" in args:
            assert "checkpoint-4 at step 4" in " ".join(result.output.split()), result.output
        ran.add(" ".join(names))
    assert ran == set(EXPECTED_OUTPUT)  # every command the README shows ran
    out = Path(stand_ins["outputs/lora-out"])
    assert (out / "adapter_model.safetensors").is_file() and (Path(stand_ins["merged"]) / "config.json").is_file()
