"""The ``convert`` and ``inspect`` commands: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from reference_layouts import RefRun, linear_sizes, trained_state, write_final
from safetensors.torch import load_file, save_file
from test_formats import source_adapter, tiny_llama

from prolora_export.cli import main, missing_extra
from prolora_export.formats.prolora import save_adapter

HP = dict(r=6, unshared_r=1, sharing_rate_a=2, sharing_rate_b=3)
ALL_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, *fragments: str) -> None:
    """Exit 2, exactly one line starting with 'error:', containing every fragment, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_convert_reference_to_prolora_to_peft(tmp_path: Path) -> None:
    run_ = RefRun(6, 1, 2, 2)  # the reference's final folder (transformers < 4.35: only the expanded .bin)
    write_final(tmp_path / "ref", trained_state(linear_sizes(tiny_llama()), run_), run_)
    (tmp_path / "ref" / "adapter_model.safetensors").unlink()
    done = run("convert", tmp_path / "ref", "--to", "prolora", "--out", tmp_path / "ours", "--allow-pickle")
    assert done.exit_code == 0, done.output
    assert "reference-expanded → prolora: 14 modules" in done.output
    done = run("convert", tmp_path / "ours", "--to", "peft", "--out", tmp_path / "peft")
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert_clean_error(run("convert", tmp_path / "ours", "--to", "peft", "--out", tmp_path / "peft"), "already exists")
    assert run("convert", tmp_path / "ours", "--to", "peft", "--out", tmp_path / "peft", "--force").exit_code == 0


def test_inspect_adapter_text_and_json(tmp_path: Path) -> None:
    adapter, _ = source_adapter(**HP)
    save_adapter(tmp_path / "ours", adapter)
    text = run("inspect", tmp_path / "ours")
    assert text.exit_code == 0, text.output
    assert "(prolora)" in text.output and "model.layers.1.mlp.down_proj" in text.output and "100→72" in text.output
    data = json.loads(run("inspect", tmp_path / "ours", "--json").output)
    assert data["parameters"] == adapter.num_parameters
    assert data["bytes"] == 4 * adapter.num_parameters
    lora = sum(6 * (s["in_features"] + s["out_features"]) for s in adapter.config.modules.values())
    assert data["lora_parameters"] == lora
    assert math.isclose(data["ratio"], adapter.num_parameters / lora)
    down = next(row for row in data["layers"] if row["path"] == "model.layers.0.mlp.down_proj")
    assert down["tensors"] == {
        "prolora_A_shard": [5, 50],
        "prolora_B_shard": [24, 5],
        "prolora_A_unshared": [1, 100],
        "prolora_B_unshared": [72, 1],
    }


def test_inspect_plans_from_model_without_adapter(tiny_model_dir: Path) -> None:
    done = run(
        "inspect", "--base", tiny_model_dir, "--r", "8", "--unshared-r", "1", "--target-modules", ALL_TARGETS, "--json"
    )
    assert done.exit_code == 0, done.output
    data = json.loads(done.output)
    shapes = [(72, 72), (72, 24), (72, 24), (72, 72), (72, 100), (72, 100), (100, 72)]
    expected = 2 * sum(7 * (math.ceil(i / 2) + math.ceil(o / 2)) + (i + o) for i, o in shapes)
    assert data["parameters"] == expected and len(data["layers"]) == 14
    assert data["lora_parameters"] == 2 * sum(8 * (i + o) for i, o in shapes)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["inspect"], ["give an ADAPTER folder"]),
        (["inspect", "/nonexistent/adapter"], ["adapter folder not found"]),
        (["inspect", "--base", "{model}", "--r", "4", "--unshared-r", "5"], ["'unshared_r' must be in [0, r=4]"]),
        (["inspect", "--base", "{model}", "--target-modules", "nope"], ["no module matches", "q_proj"]),
        (["convert", "{peft}", "--to", "prolora", "--out", "{tmp}/x"], ["cannot be converted to PRoLoRA"]),
        (["convert", "{model}", "--to", "peft", "--out", "{tmp}/x"], ["looks like a model folder"]),
    ],
)
def test_bad_input_gives_exit_2_and_one_line(tmp_path: Path, tiny_model_dir: Path, args, fragments) -> None:
    adapter, _ = source_adapter(**HP)
    from prolora_export.formats.peft_lora import save_peft

    save_peft(tmp_path / "peft", adapter)
    weights = tmp_path / "peft" / "adapter_model.safetensors"  # random factors: a LoRA with no chunk structure
    save_file({k: torch.randn(v.shape) for k, v in load_file(str(weights)).items()}, str(weights))
    fill = {"model": str(tiny_model_dir), "peft": str(tmp_path / "peft"), "tmp": str(tmp_path)}
    assert_clean_error(run(*[a.format(**fill) for a in args]), *fragments)
    assert not (tmp_path / "x").exists()


def test_real_process_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"format": "prolora", "r": ')
    cmd = [sys.executable, "-m", "prolora_export", "convert", str(tmp_path / "bad"), "--to", "peft"]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "malformed JSON" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_inspect_demo_model_all_projections(demo_model: Path) -> None:
    """SmolLM2-135M, r=8, u=1, m=n=2 on all seven projections: 0.5625 of LoRA r=8 (SPEC formula)."""
    done = run(
        "inspect", "--base", demo_model, "--r", "8", "--unshared-r", "1", "--sharing-rate-a", "2",
        "--sharing-rate-b", "2", "--target-modules", ALL_TARGETS, "--json",
    )  # fmt: skip
    data = json.loads(done.output)
    assert data["parameters"] == 1_373_760 and data["lora_parameters"] == 2_442_240
    assert data["ratio"] == 0.5625 and len(data["layers"]) == 210


def test_missing_onnx_extra_is_one_line_naming_the_extra() -> None:
    """Without the ONNX stack (the core install, e.g. on transformers 5.x) ONNX commands say what to install."""
    code = "import sys; sys.modules['onnx'] = None\nfrom prolora_export.cli import main\nmain(['onnx', '--help'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'prolora-export[onnx]'" in lines[0], done.stderr
    assert "[onnx]" in missing_extra(ModuleNotFoundError(name="optimum.exporters.onnx"))
    assert missing_extra(ModuleNotFoundError(name="no_such_package")) is None


def test_top_level_help_lists_commands_without_importing_them() -> None:
    """``prolora-export --help`` (issue 28 item 21) imports no command module, so none of torch,
    transformers or onnx: listing the commands costs what one subcommand's --help does."""
    code = (
        "import sys\n"
        "from prolora_export.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('torch', 'transformers', 'onnx', 'onnxruntime', 'optimum', 'numpy', 'prolora_export.cli.train')\n"
        "print('IMPORTED', sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "IMPORTED []" in done.stdout, done.stdout
    assert "merge  " in done.stdout and "Write a drop-in copy of MODEL" in done.stdout


def test_command_list_summaries_are_the_commands_own_first_sentences() -> None:
    """The summaries the top-level help shows without importing the commands stay their docstrings'."""
    import importlib

    from prolora_export.cli import COMMANDS, SUMMARIES

    assert SUMMARIES.keys() == COMMANDS.keys()
    for name, module in COMMANDS.items():
        command = importlib.import_module(f"prolora_export.cli.{module}").command
        assert command.get_short_help_str(limit=10_000) == SUMMARIES[name], name
