"""`kimitune inspect`: a model's layer pattern, parameter counts and weight memory, read from the meta model."""

from __future__ import annotations

from typer.testing import CliRunner

from kimitune.cli import app


def test_inspect_prints_a_preset_and_refuses_an_unknown_model():
    result = CliRunner().invoke(app, ["inspect", "tiny"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "KDA KDA KDA MLA" in result.output and "1.35M (1,348,268)" in result.output
    missing = CliRunner().invoke(app, ["inspect", "no-such-model"])
    assert missing.exit_code == 2 and "no model config" in missing.output
