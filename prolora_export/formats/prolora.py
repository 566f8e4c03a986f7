"""The PRoLoRA adapter folder of SPEC §2: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reading validates everything (config, tensor names, shapes, dtypes, NaN/Inf) and
reports every problem at once, before any caller does work with the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import CONFIG_NAME, WEIGHTS_NAME, PRoLoRAConfig
from ..errors import PRoLoRAError, raise_if
from ..outputs import atomic_output_dir
from ..shards import TENSOR_NAMES, delta_weight, full_factors

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: a bound on |γ·B·A| above this means ΔW (and a merged weight) may not fit in float32
MAX_DELTA = torch.finfo(torch.float32).max / 4


@dataclass
class Adapter:
    """An adapter in memory: its config and its tensors keyed ``P.prolora_A_shard`` etc."""

    config: PRoLoRAConfig
    tensors: dict[str, torch.Tensor]

    def module_tensors(self, path: str) -> tuple[torch.Tensor | None, ...]:
        """(A₀, B₀, A_u, B_u) of one module, None where a pair is absent: the order of :mod:`shards`."""
        return tuple(self.tensors.get(f"{path}.{name}") for name in TENSOR_NAMES)

    def delta_weight(self, path: str) -> torch.Tensor:
        """ΔW (d_out × d_in, fp32) of one module."""
        return delta_weight(self.config.module_geometry(path), self.config.scaling, *self.module_tensors(path))

    def factors(self, path: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Full (B, A) of one module, γ not applied."""
        return full_factors(self.config.module_geometry(path), *self.module_tensors(path), dtype=dtype)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def expected_shapes(config: PRoLoRAConfig) -> dict[str, tuple[int, int]]:
    """Every tensor key the config implies, with its shape."""
    return {
        f"{path}.{name}": shape
        for path in config.modules
        for name, shape in config.module_geometry(path).tensor_shapes().items()
    }


def tensor_problems(config: PRoLoRAConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected, misshapen, non-float and non-finite tensors, all of them."""
    expected = expected_shapes(config)
    problems = [f"missing tensor '{k}' (expected shape {list(s)})" for k, s in expected.items() if k not in tensors]
    problems += [f"unexpected tensor '{k}' (no such module/tensor in the config)" for k in tensors if k not in expected]
    for key, tensor in tensors.items():
        if key not in expected:
            continue
        if tuple(tensor.shape) != expected[key]:
            problems.append(f"tensor '{key}' has shape {list(tensor.shape)}, expected {list(expected[key])}")
        elif tensor.dtype not in FLOAT_DTYPES:
            problems.append(f"tensor '{key}' has dtype {tensor.dtype}, expected a floating-point type")
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(f"tensor '{key}' contains NaN or Inf")
    return problems or _overflow_problems(config, tensors)


def factor_maxima(tensors: dict[str, torch.Tensor], path: str) -> tuple[float, float]:
    """(max |A|, max |B|) over one module's shard and unshared tensors: with r they bound |B·A|."""
    present = [tensors.get(f"{path}.{name}") for name in TENSOR_NAMES]
    a_max, b_max = (
        max((float(t.abs().max()) for t in pair if t is not None and t.numel()), default=0.0)
        for pair in (present[0::2], present[1::2])
    )
    return a_max, b_max


def _overflow_problems(config: PRoLoRAConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Finite tensors can still overflow: |ΔW| ≤ max(1, |γ|)·r·max|B|·max|A| must stay in float32 range.

    (The product B·A is formed before γ is applied, hence max(1, |γ|).)
    """
    problems = []
    for path in config.modules:
        a_max, b_max = factor_maxima(tensors, path)
        bound = max(1.0, abs(config.scaling)) * config.r * a_max * b_max
        if bound > MAX_DELTA:
            problems.append(
                f"module '{path}': γ·B·A may reach {bound:.3g}, beyond float32 range (lora_alpha "
                f"{config.lora_alpha:g}, largest |A| {a_max:.3g}, |B| {b_max:.3g}): a corrupted adapter?"
            )
    return problems


def read_safetensors(path: Path, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning truncation/corruption into a one-line error."""
    if not path.is_file():
        raise PRoLoRAError("file not found", str(path))
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise PRoLoRAError(f"is {path.stat().st_size} bytes, more than the config allows ({max_bytes})", str(path))
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise PRoLoRAError(f"not a valid safetensors file ({err})", str(path)) from None


def load_adapter(directory: str | Path) -> Adapter:
    """Read and fully validate a PRoLoRA adapter folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PRoLoRAError("adapter folder not found" if not directory.exists() else "not a folder", str(directory))
    config = PRoLoRAConfig.load(directory)
    if not config.modules:
        raise PRoLoRAError("'modules' is empty: the adapter adapts no layer", str(directory / CONFIG_NAME))
    limit = 8 * sum(s[0] * s[1] for s in expected_shapes(config).values()) + (1 << 20)
    tensors = read_safetensors(directory / WEIGHTS_NAME, max_bytes=limit)
    raise_if(tensor_problems(config, tensors), str(directory / WEIGHTS_NAME))
    return Adapter(config, tensors)


def write_adapter_files(directory: Path, adapter: Adapter) -> None:
    """Write both files into an existing folder (no atomicity: see :func:`save_adapter`)."""
    raise_if(tensor_problems(adapter.config, adapter.tensors))
    adapter.config.save(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.tensors.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "prolora_format_version": "1"})


def save_adapter(directory: str | Path, adapter: Adapter, force: bool = False) -> Path:
    """Validate, then write the adapter folder atomically."""
    with atomic_output_dir(directory, force=force) as tmp:
        write_adapter_files(tmp, adapter)
    return Path(directory)
