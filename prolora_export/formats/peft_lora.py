"""PEFT LoRA folders (SPEC §3): what PEFT, vLLM and most servers load.

Writing expands a PRoLoRA adapter into full factors A (r × d_in) and B (d_out × r)
with :mod:`prolora_export.shards`, so ``PeftModel.from_pretrained`` gives exactly our
outputs. Reading gives the full factors back, validated, for the reference reader
(its saved checkpoints are PEFT LoRA plus extra fields) and for ``inspect``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import CONFIG_NAME, WEIGHTS_NAME, PRoLoRAConfig, read_json
from ..errors import PRoLoRAError, raise_if
from ..outputs import atomic_output_dir
from ..shards import reconstruct_a, reconstruct_b
from .prolora import FLOAT_DTYPES, Adapter, read_safetensors

PEFT_PREFIX = "base_model.model."
#: PEFT's (and the reference's) pickle weights file, read only on request
PICKLE_NAME = "adapter_model.bin"
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
#: PEFT options that change the math; a file that turns one on is refused, not misread.
UNSUPPORTED_OPTIONS = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "lora_bias", "modules_to_save")
#: architecture name suffix -> PEFT task_type (PeftModel picks its wrapper class from it)
TASK_TYPES = {
    "CausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "SequenceClassification": "SEQ_CLS",
    "TokenClassification": "TOKEN_CLS",
    "QuestionAnswering": "QUESTION_ANS",
}


@dataclass
class LoraFactors:
    """A LoRA adapter as full factors: module path -> (A (r × d_in), B (d_out × r))."""

    r: int
    lora_alpha: float
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    #: the whole ``adapter_config.json``, reference fields included
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


def target_names(paths: list[str] | dict) -> list[str]:
    """PEFT ``target_modules``: the sorted unique last components of the adapted paths."""
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def adapter_to_factors(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Reconstruct full A and B of every module (exact: no arithmetic, only copies)."""
    out = {}
    for path in adapter.config.modules:
        g = adapter.config.module_geometry(path)
        a_shard, b_shard, a_unshared, b_unshared = adapter.module_tensors(path)
        out[path] = (reconstruct_a(g, a_shard, a_unshared), reconstruct_b(g, b_shard, b_unshared))
    return out


def task_type(config: PRoLoRAConfig) -> str | None:
    """PEFT's task_type when it is known: kept from the config, or read from a local base model's
    ``architectures``; None otherwise (PEFT then uses its generic wrapper). Never goes online."""
    if config.extra.get("task_type"):
        return config.extra["task_type"]
    name = config.base_model_name_or_path
    if not name:
        return None
    from ..models import DEMO_ALIASES, demo_model_dir

    folder = demo_model_dir() if name.lower() in DEMO_ALIASES else Path(name)
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return next((t for a in architectures for suffix, t in TASK_TYPES.items() if a.endswith(suffix)), None)


def peft_config_dict(adapter: Adapter, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` as JSON for the adapter; ``extra`` keys are added (reference fields)."""
    config = adapter.config
    data: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type(config),
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": target_names(list(config.modules)),
        "base_model_name_or_path": config.base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "use_rslora": False,
    }
    data.update(extra or {})
    return data


def write_peft_files(directory: Path, adapter: Adapter, extra_config: dict[str, Any] | None = None) -> None:
    """Write a PEFT LoRA folder's two files into an existing folder (see :func:`save_peft`)."""
    tensors = {}
    for path, (a, b) in adapter_to_factors(adapter).items():
        tensors[f"{PEFT_PREFIX}{path}{A_SUFFIX}"] = a.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{path}{B_SUFFIX}"] = b.detach().contiguous().cpu()
    (directory / CONFIG_NAME).write_text(json.dumps(peft_config_dict(adapter, extra_config), indent=2) + "\n")
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def save_peft(directory: str | Path, adapter: Adapter, force: bool = False) -> Path:
    """Write ``adapter`` as a PEFT LoRA folder, atomically."""
    with atomic_output_dir(directory, force=force) as tmp:
        write_peft_files(tmp, adapter)
    return Path(directory)


def _positive_int(data: dict, key: str, where: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PRoLoRAError(f"'{key}' must be a positive integer, got {value!r}", where)
    return value


def read_lora_config(directory: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a LoRA folder, with r, lora_alpha and the math options checked."""
    where = str(directory / CONFIG_NAME)
    data = read_json(directory / CONFIG_NAME)
    if not isinstance(data, dict):
        raise PRoLoRAError(f"expected a JSON object, got {type(data).__name__}", where)
    if data.get("peft_type") != "LORA":
        raise PRoLoRAError(f"'peft_type' must be \"LORA\", got {data.get('peft_type')!r}", where)
    _positive_int(data, "r", where)
    alpha = data.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha != alpha or abs(alpha) == float("inf"):
        raise PRoLoRAError(f"'lora_alpha' must be a finite number, got {alpha!r}", where)
    used = [k for k in UNSUPPORTED_OPTIONS if data.get(k)]
    raise_if([f"'{k}' = {data[k]!r} is not supported (plain LoRA only)" for k in used], where)
    return data


#: a key with PEFT's adapter-name level still in it (``model.state_dict()`` of a PeftModel keeps it;
#: ``save_pretrained`` drops it): ``P.lora_A.default.weight``, ``P.lora_A_vec.default`` (reference code)
NAMED_KEY = re.compile(r"^(?P<head>.+\.(?:lora_[AB]|lora_[AB]_vec))\.(?P<name>[^.]+)(?P<tail>\.weight)?$")


def without_adapter_name(keys: list[str], where: str) -> dict[str, str]:
    """Key -> the same key without PEFT's adapter-name level, when every LoRA key has one and the same.

    ``P.lora_A.weight`` (no name) never matches: ``weight`` would be the name but then the tail is
    missing, and a plain vec key has no level after it. Several names (several adapters in one
    file) are refused rather than guessed.
    """
    found = {k: m for k in keys if (m := NAMED_KEY.match(k)) and (m["tail"] or m["head"].endswith("_vec"))}
    found = {k: m for k, m in found.items() if not (m["name"] == "weight" and m["tail"] is None)}
    names = sorted({m["name"] for m in found.values()})
    if len(names) > 1:
        raise PRoLoRAError(f"the file holds several adapters ({', '.join(names)}); keep one", where)
    return {k: (f"{found[k]['head']}{found[k]['tail'] or ''}" if k in found else k) for k in keys}


def read_lora_tensors(directory: Path, strip_prefix: bool = True) -> dict[str, torch.Tensor]:
    """The safetensors weights of a LoRA-like folder, keys as :func:`lora_keys` gives them."""
    weights = directory / WEIGHTS_NAME
    if not weights.is_file() and (directory / PICKLE_NAME).is_file():
        raise PRoLoRAError(
            f"only a pickle {PICKLE_NAME}: it is not read by default because unpickling can run code; "
            "pass --allow-pickle to read its tensors safely (torch.load with weights_only=True)",
            str(directory),
        )
    return lora_keys(read_safetensors(weights), str(weights), strip_prefix)


def lora_keys(tensors: dict[str, torch.Tensor], where: str, strip_prefix: bool = True) -> dict[str, torch.Tensor]:
    """Keys without PEFT's adapter-name level (:func:`without_adapter_name`) and, by default,
    without the ``base_model.model.`` prefix."""
    renamed = without_adapter_name(list(tensors), where)
    tensors = {renamed[k]: v for k, v in tensors.items()}
    if not strip_prefix:
        return tensors
    return {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}


def check_tensor(key: str, tensor: torch.Tensor, shape: tuple[int, ...] | None = None) -> list[str]:
    """Shape, dtype and finiteness problems of one tensor (shape checked only when given)."""
    if shape is not None and tuple(tensor.shape) != shape:
        return [f"tensor '{key}' has shape {list(tensor.shape)}, expected {list(shape)}"]
    if tensor.dtype not in FLOAT_DTYPES:
        return [f"tensor '{key}' has dtype {tensor.dtype}, expected a floating-point type"]
    if not bool(torch.isfinite(tensor).all()):
        return [f"tensor '{key}' contains NaN or Inf"]
    return []


def load_peft_lora(directory: str | Path) -> LoraFactors:
    """Read and validate a PEFT LoRA folder into full factors, every problem reported at once."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PRoLoRAError("adapter folder not found" if not directory.exists() else "not a folder", str(directory))
    return lora_factors(read_lora_tensors(directory), read_lora_config(directory), str(directory / WEIGHTS_NAME))


def lora_factors(tensors: dict[str, torch.Tensor], data: dict[str, Any], where: str) -> LoraFactors:
    """Full factors from a LoRA tensor dict (keys without the PEFT prefix), checked against the config's r.

    Widths are not checked against anything: a reference file may hold tensors wider than the layer.
    """
    r = data["r"]
    paths = sorted({k[: -len(s)] for k in tensors for s in (A_SUFFIX, B_SUFFIX) if k.endswith(s)})
    problems = [
        f"unexpected tensor '{k}' (expected only *{A_SUFFIX} and *{B_SUFFIX})"
        for k in tensors
        if not k.endswith((A_SUFFIX, B_SUFFIX))
    ]
    if not paths and not problems:
        problems.append("no LoRA tensors (*.lora_A.weight / *.lora_B.weight)")
    factors = {}
    for path in paths:
        a, b = tensors.get(path + A_SUFFIX), tensors.get(path + B_SUFFIX)
        missing = [path + s for s, t in ((A_SUFFIX, a), (B_SUFFIX, b)) if t is None]
        if missing:
            problems += [f"missing tensor '{k}'" for k in missing]
            continue
        if a.dim() != 2 or b.dim() != 2:
            problems.append(f"module '{path}': lora_A/lora_B must be matrices, got {list(a.shape)}, {list(b.shape)}")
            continue
        found = check_tensor(path + A_SUFFIX, a, (r, a.shape[1])) + check_tensor(path + B_SUFFIX, b, (b.shape[0], r))
        problems += found
        if not found:
            factors[path] = (a, b)
    raise_if(problems, where)
    return LoraFactors(r, float(data["lora_alpha"]), factors, data)


def factors_as_adapter(lora: LoraFactors) -> Adapter:
    """Plain LoRA is PRoLoRA with u = r (no sharing): lossless, but not compact (used by ``inspect``)."""
    config = PRoLoRAConfig(
        r=lora.r,
        unshared_r=lora.r,
        sharing_rate_a=1,
        sharing_rate_b=1,
        lora_alpha=lora.lora_alpha,
        lora_dropout=float(lora.config.get("lora_dropout") or 0.0),
        target_modules=target_names(list(lora.factors)),
        base_model_name_or_path=lora.config.get("base_model_name_or_path"),
        modules={p: {"in_features": a.shape[1], "out_features": b.shape[0]} for p, (a, b) in lora.factors.items()},
    )
    tensors = {}
    for path, (a, b) in lora.factors.items():
        tensors[f"{path}.prolora_A_unshared"] = a
        tensors[f"{path}.prolora_B_unshared"] = b
    return Adapter(config, tensors)
