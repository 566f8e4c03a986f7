"""Fuzzing: random valid and broken adapter folders through the CLI.

Every outcome must be either success with a correct result, or exit code 2 with one
line naming the problem and no output written. Anything else (a traceback, another
exit code, a half-written folder) fails the test. `FUZZ_EXAMPLES` raises the count for a
longer run on demand: `FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from prolora_export.cli import main
from prolora_export.config import PRoLoRAConfig
from prolora_export.formats.prolora import Adapter, write_adapter_files
from prolora_export.shards import delta_weight

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))


@st.composite
def valid_adapters(draw) -> Adapter:
    r = draw(st.integers(1, 6))
    config = PRoLoRAConfig(
        r=r,
        unshared_r=draw(st.integers(0, r)),
        sharing_rate_a=draw(st.integers(1, 4)),
        sharing_rate_b=draw(st.integers(1, 4)),
        rotate=draw(st.booleans()),
        lora_alpha=float(draw(st.integers(1, 32))),
        lora_dropout=0.0,
        target_modules=["proj"],
    )
    n_modules = draw(st.integers(1, 3))
    config.modules = {
        f"layers.{i}.proj": {"in_features": draw(st.integers(1, 24)), "out_features": draw(st.integers(1, 24))}
        for i in range(n_modules)
    }
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tensors = {}
    for path in config.modules:
        for name, shape in config.module_geometry(path).tensor_shapes().items():
            tensors[f"{path}.{name}"] = torch.randn(shape, generator=gen)
    return Adapter(config, tensors)


def _config_mutation(key: str, value):
    def mutate(folder: Path) -> None:
        path = folder / "adapter_config.json"
        data = json.loads(path.read_text())
        data[key] = value
        path.write_text(json.dumps(data))

    return mutate


def _tensor_mutation(kind: str):
    def mutate(folder: Path) -> None:
        path = folder / "adapter_model.safetensors"
        tensors = load_file(str(path))
        key = sorted(tensors)[0]
        if kind == "drop":
            del tensors[key]
        elif kind == "extra":
            tensors["not.a.module.prolora_A_shard"] = torch.zeros(1, 1)
        elif kind == "reshape":
            tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
        elif kind == "nan":
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] = float("nan")
        elif kind == "int":
            tensors[key] = tensors[key].to(torch.int32)
        save_file(tensors, str(path))

    return mutate


def _bytes_mutation(name: str, how: str, data: bytes):
    def mutate(folder: Path) -> None:
        path = folder / name
        raw = path.read_bytes()
        if how == "truncate":
            path.write_bytes(raw[: len(raw) // 2])
        elif how == "random":
            path.write_bytes(data)
        elif how == "delete":
            path.unlink()

    return mutate


bad_values = st.one_of(
    st.integers(-3, 0), st.just(2**40), st.floats(allow_nan=True), st.text(max_size=3), st.none(), st.booleans()
)
mutations = st.one_of(
    st.builds(
        _config_mutation,
        st.sampled_from(
            [
                "r",
                "unshared_r",
                "sharing_rate_a",
                "sharing_rate_b",
                "stride_a",
                "stride_b",
                "lora_alpha",
                "lora_dropout",
                "rotate",
                "format",
                "format_version",
                "modules",
                "target_modules",
            ]
        ),
        bad_values,
    ),
    st.builds(_tensor_mutation, st.sampled_from(["drop", "extra", "reshape", "nan", "int"])),
    st.builds(
        _bytes_mutation,
        st.sampled_from(["adapter_config.json", "adapter_model.safetensors"]),
        st.sampled_from(["truncate", "random", "delete"]),
        st.binary(max_size=64),
    ),
)


def _check_outcome(result, out: Path) -> bool:
    """Exit 0, or exit 2 with one 'error:' line and nothing at ``out``. Returns success."""
    assert "Traceback" not in result.output, result.output
    assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
    if result.exit_code == 2:
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert not out.exists()
        return False
    return True


def _peft_delta(folder: Path, path: str) -> torch.Tensor:
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    a = tensors[f"base_model.model.{path}.lora_A.weight"].double()
    b = tensors[f"base_model.model.{path}.lora_B.weight"].double()
    return (b @ a) * (config["lora_alpha"] / config["r"])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapter=valid_adapters(), mutation=st.one_of(st.none(), mutations))
def test_every_command_succeeds_correctly_or_fails_cleanly(adapter: Adapter, mutation) -> None:
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as scratch:
        folder, out = Path(scratch) / "adapter", Path(scratch) / "peft"
        folder.mkdir()
        write_adapter_files(folder, adapter)
        if mutation is not None:
            mutation(folder)

        inspect_ok = _check_outcome(runner.invoke(main, ["inspect", str(folder)]), Path(scratch) / "unused")

        converted = runner.invoke(main, ["convert", str(folder), "--to", "peft", "--out", str(out)])
        if _check_outcome(converted, out):
            assert inspect_ok, "convert accepted what inspect refused"
            if mutation is None:  # a correct result: the same ΔW as SPEC's reconstruction
                for path in adapter.config.modules:
                    expected = delta_weight(
                        adapter.config.module_geometry(path),
                        adapter.config.scaling,
                        *adapter.module_tensors(path),
                        dtype=torch.float64,
                    )
                    torch.testing.assert_close(_peft_delta(out, path), expected, rtol=1e-5, atol=1e-6)
        if mutation is None:
            assert inspect_ok and converted.exit_code == 0, converted.output
