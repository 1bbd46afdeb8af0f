"""`kimitune inspect`: a preset, a config.json or a model folder; a clear error for anything else."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from kimitune.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_inspect_prints_the_summary_of_a_preset_a_config_file_or_a_folder(tmp_path):
    for model in ("tiny", str(ROOT / "examples/models/tiny.json")):
        result = CliRunner().invoke(app, ["inspect", model])
        assert result.exit_code == 0, result.output
        assert "KDA KDA KDA MLA" in result.output and "1.35M (1,348,268)" in result.output
        assert max(len(line) for line in result.output.splitlines()) <= 80
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((ROOT / "examples/models/kimi-linear-48b-a3b.json").read_text())
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0 and "total parameters" in result.output and "B (" in result.output


def test_inspect_names_what_it_cannot_read(tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert f"no model config at {tmp_path / 'nothing'}: give a model folder, a config.json or a preset name " \
           "(kimi-linear-48b-a3b, tiny)" in result.output
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama"}')
    result = CliRunner().invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 2 and f"{bad}: field 'model_type': expected 'kimi_linear'" in result.output
