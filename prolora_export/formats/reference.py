"""The reference implementation's two layouts (SPEC §3), read exactly and written for tests.

* training layout: the shards themselves under the reference's names
  (``lora_A.weight`` = A₀, ``lora_B.weight`` = B₀, ``lora_A_vec`` = A_u, ``lora_B_vec`` = B_uᵀ);
* expanded layout (its saved checkpoints): PEFT LoRA with full A and B plus the
  reference fields in ``adapter_config.json``. Turning it back into shards is only done
  after proving, bit for bit, that every chunk is the rotation of the first one.

Layer sizes: the expanded layout and the training layout with u > 0 carry d_in and
d_out in their tensors. The training layout with u = 0 does not (c_A = ceil(d_in/m)
has several solutions), so reading it needs the base model's layer sizes (``shapes``,
from ``--base``) and fails with a message saying so otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import CONFIG_NAME, WEIGHTS_NAME, PRoLoRAConfig
from ..errors import PRoLoRAError, raise_if
from ..outputs import atomic_output_dir
from ..shards import rotation_mismatch, split_shards
from .peft_lora import (
    A_SUFFIX,
    B_SUFFIX,
    PEFT_PREFIX,
    load_peft_lora,
    read_lora_config,
    read_lora_tensors,
    target_names,
    write_peft_files,
)
from .prolora import Adapter, tensor_problems

#: reference config key -> our PRoLoRAConfig field
FIELDS = {
    "reduce_lora_A_x": "sharing_rate_a",
    "reduce_lora_B_x": "sharing_rate_b",
    "unshared_r": "unshared_r",
    "enable_lora_rotation": "rotate",
    "lora_A_shift_size": "stride_a",
    "lora_B_shift_size": "stride_b",
}
REQUIRED = ("reduce_lora_A_x", "reduce_lora_B_x")
A_VEC = ".lora_A_vec"
B_VEC = ".lora_B_vec"

Shapes = dict[str, tuple[int, int]]


def has_reference_fields(config: dict[str, Any]) -> bool:
    return any(key in config for key in REQUIRED)


def config_from_reference(data: dict[str, Any], modules: Shapes, where: str) -> PRoLoRAConfig:
    """Our config from the reference fields; problems name the reference keys."""
    raise_if([f"missing key '{k}'" for k in REQUIRED if k not in data], where)
    values = {ours: data[theirs] for theirs, ours in FIELDS.items() if theirs in data}
    values.setdefault("unshared_r", 0)
    config = PRoLoRAConfig(
        r=data["r"],
        lora_alpha=data["lora_alpha"],
        lora_dropout=float(data.get("lora_dropout") or 0.0),
        target_modules=target_names(list(modules)),
        base_model_name_or_path=data.get("base_model_name_or_path"),
        modules={p: {"in_features": i, "out_features": o} for p, (i, o) in modules.items()},
        **values,
    )
    problems = config.problems()
    for theirs, ours in FIELDS.items():
        problems = [p.replace(f"'{ours}'", f"'{theirs}'") for p in problems]
    raise_if(problems, where)
    return config


def reference_fields(config: PRoLoRAConfig) -> dict[str, Any]:
    """The reference's config keys for one of our configs (strides resolved: the reference has no null)."""
    out: dict[str, Any] = {theirs: getattr(config, ours) for theirs, ours in FIELDS.items()}
    if config.modules and config.shared_r > 0:
        g = config.module_geometry(next(iter(config.modules)))
        out["lora_A_shift_size"], out["lora_B_shift_size"] = g.stride_a, g.stride_b
    else:  # no shared rank: strides are meaningless, 0 is the one valid value
        out["lora_A_shift_size"] = out["lora_B_shift_size"] = 0
    return out


# --------------------------------------------------------------------------- expanded layout
def load_reference_expanded(directory: str | Path) -> Adapter:
    """Full A/B + reference fields → shards, after a bitwise check of the rotated-chunk structure."""
    directory = Path(directory)
    lora = load_peft_lora(directory)
    where = str(directory / CONFIG_NAME)
    shapes = {p: (a.shape[1], b.shape[0]) for p, (a, b) in lora.factors.items()}
    config = config_from_reference(lora.config, shapes, where)
    tensors: dict[str, torch.Tensor] = {}
    for path, (a, b) in lora.factors.items():
        g = config.module_geometry(path)
        broken = rotation_mismatch(g, a, b)
        if broken:
            hint = (
                " (if this is a training-layout checkpoint with unshared_r = 0, pass --base MODEL)"
                if config.unshared_r == 0
                else ""
            )
            raise PRoLoRAError(
                f"module '{path}': {broken}; this is not a PRoLoRA checkpoint with m={g.sharing_rate_a}, "
                f"n={g.sharing_rate_b}, s_A={g.stride_a}, s_B={g.stride_b}, so it cannot be compacted{hint}",
                str(directory / WEIGHTS_NAME),
            )
        tensors.update({f"{path}.{k}": v for k, v in split_shards(g, a, b).items()})
    return Adapter(config, tensors)


def write_reference_expanded(directory: Path, adapter: Adapter) -> None:
    """The reference's saved-checkpoint layout: PEFT LoRA plus its fields (into an existing folder)."""
    write_peft_files(directory, adapter, extra_config=reference_fields(adapter.config))


# --------------------------------------------------------------------------- training layout
def _training_shapes(tensors: dict[str, torch.Tensor], paths: list[str], u: int, base: Shapes | None) -> Shapes:
    """(d_in, d_out) per module: from the unshared tensors when u > 0, else from the base model."""
    if u > 0:
        return {p: (tensors[p + A_VEC].shape[-1], tensors[p + B_VEC].shape[-1]) for p in paths}
    if base is None:
        raise PRoLoRAError(
            "this reference training-layout adapter has unshared_r = 0, so its files do not say the layer "
            "sizes; pass --base MODEL (the model it was trained on)"
        )
    unknown = [p for p in paths if p not in base]
    raise_if([f"module '{p}' does not exist in the base model (or is not a Linear layer)" for p in unknown])
    return {p: base[p] for p in paths}


def load_reference_training(directory: str | Path, base_shapes: Shapes | None = None) -> Adapter:
    """The training-time layout → our Adapter (a renaming and one transpose: exact)."""
    directory = Path(directory)
    data = read_lora_config(directory)
    tensors = read_lora_tensors(directory)
    where = str(directory / WEIGHTS_NAME)
    u = config_from_reference(data, {}, str(directory / CONFIG_NAME)).unshared_r  # hyperparameters first
    suffixes = (A_SUFFIX, B_SUFFIX, A_VEC, B_VEC)
    problems = [f"unexpected tensor '{k}'" for k in tensors if not k.endswith(suffixes)]
    paths = sorted({k[: -len(s)] for k in tensors for s in suffixes if k.endswith(s)})
    needed = [
        s
        for s, present in ((A_SUFFIX, data["r"] > u), (B_SUFFIX, data["r"] > u), (A_VEC, u > 0), (B_VEC, u > 0))
        if present
    ]
    problems += [f"missing tensor '{p}{s}'" for p in paths for s in needed if p + s not in tensors]
    problems += [f"unexpected tensor '{p}{s}'" for p in paths for s in suffixes if s not in needed and p + s in tensors]
    raise_if(problems or ([] if paths else ["no reference tensors (*.lora_A.weight, *.lora_A_vec …)"]), where)
    bad_vec = [p for p in paths if u > 0 and (tensors[p + A_VEC].dim() != 2 or tensors[p + B_VEC].dim() != 2)]
    raise_if([f"module '{p}': lora_A_vec / lora_B_vec must be matrices" for p in bad_vec], where)
    config = config_from_reference(data, _training_shapes(tensors, paths, u, base_shapes), str(directory / CONFIG_NAME))
    ours: dict[str, torch.Tensor] = {}
    for path in paths:
        renamed = {A_SUFFIX: "prolora_A_shard", B_SUFFIX: "prolora_B_shard", A_VEC: "prolora_A_unshared"}
        for suffix, name in renamed.items():
            if path + suffix in tensors:
                ours[f"{path}.{name}"] = tensors[path + suffix]
        if path + B_VEC in tensors:
            ours[f"{path}.prolora_B_unshared"] = tensors[path + B_VEC].t().contiguous()
    theirs = {
        "prolora_A_shard": A_SUFFIX,
        "prolora_B_shard": B_SUFFIX,
        "prolora_A_unshared": A_VEC,
        "prolora_B_unshared": B_VEC + " (transposed)",
    }
    problems = tensor_problems(config, ours)
    for name, suffix in theirs.items():
        problems = [p.replace(f".{name}'", f"{suffix}'") for p in problems]
    raise_if(problems, where)
    return Adapter(config, ours)


def write_reference_training(directory: Path, adapter: Adapter) -> None:
    """The training-time layout (into an existing folder): used to build fixtures and by tests."""
    config = adapter.config
    data = {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": target_names(list(config.modules)),
        "base_model_name_or_path": config.base_model_name_or_path,
        **reference_fields(config),
    }
    tensors = {}
    for path in config.modules:
        a_shard, b_shard, a_unshared, b_unshared = adapter.module_tensors(path)
        for suffix, tensor in (
            (A_SUFFIX, a_shard),
            (B_SUFFIX, b_shard),
            (A_VEC, a_unshared),
            (B_VEC, None if b_unshared is None else b_unshared.t()),
        ):
            if tensor is not None:
                tensors[PEFT_PREFIX + path + suffix] = tensor.detach().contiguous().cpu()
    (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def save_reference(directory: str | Path, adapter: Adapter, expanded: bool, force: bool = False) -> Path:
    """Write either reference layout atomically."""
    with atomic_output_dir(directory, force=force) as tmp:
        (write_reference_expanded if expanded else write_reference_training)(tmp, adapter)
    return Path(directory)
