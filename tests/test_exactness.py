"""Silent wrong results of issue 14 (items 1–4, 22) and their classes: each situation here once
gave exit code 0 and a wrong model, file or graph. Every test fails on the code before the fix.

- orientation of a base weight comes from the module's type, never from shapes or model type;
- one rule for merging into a weight shared with another module (tied lm_head), in every command;
- ``.onnx_adapter`` files record what the compact graph bakes in, and a file that does not fit
  a graph is refused wherever one is applied;
- no numeric option accepts nan or inf;
- options that do not apply to a mode are refused, not ignored.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_adapter, tiny_llama

from prolora_export.cli import main
from prolora_export.errors import PRoLoRAError
from prolora_export.formats.prolora import save_adapter
from prolora_export.merge import merge_adapters
from prolora_export.onnx.export import export_onnx


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama folder and one random adapter for it."""
    root = tmp_path_factory.mktemp("exact")
    base = tiny_llama()
    base.save_pretrained(root / "base", safe_serialization=True)
    adapter = make_adapter(copy.deepcopy(base), seed=2, r=4, unshared_r=1)
    save_adapter(root / "ad", adapter)
    return {"root": root, "base": root / "base", "ad": root / "ad"}


def one_line_error(result) -> str:
    """The single ``error:`` line of a refused command (exit 2, no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


# ---------------------------------------------------------------------- item 4: non-finite numbers


NON_FINITE = ["nan", "inf", "-inf", "NaN", "+Infinity"]


@pytest.mark.parametrize("value", NON_FINITE)
def test_merge_weight_must_be_finite(llama: dict[str, Path], tmp_path: Path, value: str) -> None:
    args = ["merge", "--base", str(llama["base"]), "--adapter", str(llama["ad"]), "--weight", value]
    line = one_line_error(CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out"), "--quiet"]))
    assert "--weight" in line and "not a finite number" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_merge_library_refuses_non_finite_weights(llama: dict[str, Path], tmp_path: Path, value: float) -> None:
    with pytest.raises(PRoLoRAError, match="weight must be a finite number"):
        merge_adapters(llama["base"], [(llama["ad"], value)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--alpha", "--dropout", "--lr"])
def test_train_float_options_must_be_finite(llama: dict[str, Path], tmp_path: Path, option: str) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    args = ["train", "--base", str(llama["base"]), "--data", str(data), "--out", str(tmp_path / "o"), option, "nan"]
    line = one_line_error(CliRunner().invoke(main, args))
    assert option in line and "not a finite number" in line


def test_every_float_option_of_every_command_is_finite() -> None:
    """No command keeps click's plain float type (which parses nan and inf)."""
    import importlib

    import click

    from prolora_export.cli import COMMANDS
    from prolora_export.cli.types import FINITE_FLOAT

    floats = []
    for name, module in COMMANDS.items():
        command = importlib.import_module(f"prolora_export.cli.{module}").command
        for param in command.params:
            if isinstance(param.type, click.types.FloatParamType) or param.type is FINITE_FLOAT:
                floats.append((name, param.name, param.type is FINITE_FLOAT))
    assert floats, "expected float options (merge --weight, train --alpha …)"
    assert [f for f in floats if not f[2]] == []


# ---------------------------------------------------------------------- item 22: options of the other mode


def test_default_adapter_zero_refused_for_merged_export(llama: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PRoLoRAError, match="--default-adapter zero applies to --mode compact only"):
        export_onnx(str(llama["base"]), llama["ad"], tmp_path / "o", mode="merged", default_adapter="zero")
    args = ["onnx", "--base", str(llama["base"]), "--adapter", str(llama["ad"]), "--out", str(tmp_path / "o"),
            "--default-adapter", "zero"]
    assert "compact only" in one_line_error(CliRunner().invoke(main, args))
    assert not (tmp_path / "o").exists()
