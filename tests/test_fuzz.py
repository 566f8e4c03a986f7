"""Fuzzing: random valid and broken adapter folders through the CLI.

Every folder goes through ``inspect``, ``convert``, ``merge`` (into a tiny Llama) and
``onnx-adapter``. Every outcome must be either success with a correct result, or exit code 2
with one line naming the problem and no output written. Anything else (a traceback, another
exit code, a half-written folder) fails the test. Adapters target real layers of the tiny
model, with its sizes or random ones (an adapter "for another model"). `FUZZ_EXAMPLES` raises
the count for a longer run on demand: `FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py -s`
(the outcome counts are printed).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from prolora_export.cli import main
from prolora_export.config import PRoLoRAConfig
from prolora_export.convert import linear_shapes
from prolora_export.formats.prolora import Adapter, load_adapter, write_adapter_files
from prolora_export.shards import delta_weight

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
MODEL = tiny_llama()
#: path -> (d_in, d_out) of every Linear layer of the tiny Llama
LAYERS = linear_shapes(MODEL)


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
    paths = draw(st.lists(st.sampled_from(sorted(LAYERS)), min_size=1, max_size=3, unique=True))
    sizes = st.tuples(st.integers(1, 24), st.integers(1, 24))
    config.modules = {}
    for path in paths:  # mostly the model's own sizes; else random ones (an adapter for another model)
        d_in, d_out = LAYERS[path] if draw(st.integers(0, 3)) != 3 else draw(sizes)
        d_in, d_out = max(d_in, config.sharing_rate_a), max(d_out, config.sharing_rate_b)  # valid: m ≤ d_in, n ≤ d_out
        config.modules[path] = {"in_features": d_in, "out_features": d_out}
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


def _expected_delta(adapter: Adapter, path: str) -> torch.Tensor:
    """ΔW of one module by SPEC's reconstruction, in float64."""
    geometry, tensors = adapter.config.module_geometry(path), adapter.module_tensors(path)
    return delta_weight(geometry, adapter.config.scaling, *tensors, dtype=torch.float64)


def _fits_model(adapter: Adapter) -> bool:
    return all(LAYERS[p] == (s["in_features"], s["out_features"]) for p, s in adapter.config.modules.items())


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "tiny-llama"
    MODEL.save_pretrained(folder, safe_serialization=True)
    return folder


def fuzz_one(base: Path, adapter: Adapter, mutation, outcomes: Counter) -> None:
    """One folder through the four commands; counts ``command:ok`` / ``command:refused``."""
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as scratch:
        folder, out = Path(scratch) / "adapter", Path(scratch) / "peft"
        folder.mkdir()
        write_adapter_files(folder, adapter)
        if mutation is not None:
            mutation(folder)
        outcomes["examples"] += 1
        outcomes["valid" if mutation is None else "mutated"] += 1

        def record(command: str, ok: bool) -> bool:
            outcomes[f"{command}:{'ok' if ok else 'refused'}"] += 1
            return ok

        inspect_ok = record("inspect", _check_outcome(runner.invoke(main, ["inspect", str(folder)]), folder / "x"))
        # what the folder holds, when it is accepted: a mutation may leave it valid (alpha = -2 …)
        accepted = load_adapter(folder) if inspect_ok else None

        converted = runner.invoke(main, ["convert", str(folder), "--to", "peft", "--out", str(out)])
        if record("convert", _check_outcome(converted, out)):
            assert accepted is not None, "convert accepted what inspect refused"
            for path in accepted.config.modules:  # a correct result: the same ΔW as SPEC's reconstruction
                expected = _expected_delta(accepted, path)
                torch.testing.assert_close(_peft_delta(out, path), expected, rtol=1e-5, atol=1e-6)
        if mutation is None:
            assert inspect_ok and converted.exit_code == 0, converted.output

        merged_dir = Path(scratch) / "merged"
        merged = runner.invoke(main, ["merge", "--base", str(base), "--adapter", str(folder), "--out", str(merged_dir),
                                      "--quiet"])  # fmt: skip
        if record("merge", _check_outcome(merged, merged_dir)):
            assert accepted is not None and converted.exit_code == 0, "merge accepted what convert refused"
            _check_merged(base, merged_dir, accepted)
        if mutation is None:
            assert (merged.exit_code == 0) == _fits_model(adapter), merged.output
            if merged.exit_code == 2:
                assert "an adapter for another model?" in merged.output

        ort_file = Path(scratch) / "adapter.onnx_adapter"
        exported = runner.invoke(main, ["onnx-adapter", "--adapter", str(folder), "--out", str(ort_file)])
        if record("onnx-adapter", _check_outcome(exported, ort_file)):
            assert accepted is not None and converted.exit_code == 0, "onnx-adapter accepted what convert refused"
            stored = {k: v.numpy() for k, v in ort.AdapterFormat.read_adapter(str(ort_file)).get_parameters().items()}
            assert sorted(stored) == sorted(accepted.tensors)
            for key, tensor in accepted.tensors.items():
                torch.testing.assert_close(torch.from_numpy(stored[key]), tensor.float(), rtol=0, atol=0)
        if mutation is None:
            assert exported.exit_code == 0, exported.output


def _check_merged(base: Path, merged_dir: Path, adapter: Adapter) -> None:
    """Every weight is the base's, plus ΔW where adapted: to 1e-5 of the weight's largest entry (fp32 math)."""
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(merged_dir / "model.safetensors"))
    assert sorted(after) == sorted(before)
    for key, weight in before.items():
        path = key.removesuffix(".weight")
        expected = weight.double() + _expected_delta(adapter, path) if path in adapter.config.modules else weight
        assert bool(torch.isfinite(after[key]).all()), f"{key}: merged weight is not finite"
        scale = max(1.0, float(expected.abs().max()))
        torch.testing.assert_close(after[key].double(), expected.double(), rtol=1e-5, atol=1e-5 * scale)


def test_every_command_succeeds_correctly_or_fails_cleanly(tiny_base: Path) -> None:
    outcomes: Counter = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(adapter=valid_adapters(), mutation=st.one_of(st.none(), mutations))
    def run(adapter: Adapter, mutation) -> None:
        fuzz_one(tiny_base, adapter, mutation, outcomes)

    run()
    print(f"\nfuzz outcomes ({EXAMPLES} examples asked): {dict(sorted(outcomes.items()))}")
    assert outcomes["examples"] >= EXAMPLES, outcomes
    if EXAMPLES >= 50:  # both kinds of folder, and both outcomes of merge, were seen
        assert all(outcomes[k] for k in ("valid", "mutated", "merge:ok", "merge:refused")), outcomes
