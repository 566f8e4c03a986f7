"""Tell which of the four adapter layouts a folder holds, from its config keys and tensor names.

Only the safetensors header is read (tensor names and shapes), never the data.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..config import CONFIG_NAME, FORMAT_NAME, WEIGHTS_NAME, read_json
from ..errors import PRoLoRAError

PROLORA = "prolora"
PEFT_LORA = "peft-lora"
REFERENCE_TRAINING = "reference-training"
REFERENCE_EXPANDED = "reference-expanded"
FORMATS = (PROLORA, PEFT_LORA, REFERENCE_TRAINING, REFERENCE_EXPANDED)


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Names and shapes from a safetensors header; a truncated or foreign file is one clear error."""
    if not path.is_file():
        raise PRoLoRAError("file not found", str(path))
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise PRoLoRAError(f"not a valid safetensors file ({err})", str(path)) from None


def detect_format(directory: str | Path, base_shapes: dict[str, tuple[int, int]] | None = None) -> str:
    """One of :data:`FORMATS`, or a :class:`PRoLoRAError` saying what the folder looks like instead.

    Reference fields with ``*_vec`` tensors mean the training layout. Without them it is the
    expanded layout, except that with u = 0 the training layout has no ``*_vec`` either: then
    the base model's sizes (``base_shapes``) decide (lora_A as wide as d_in = expanded). Without
    them it is read as expanded, whose bitwise structure check refuses a training file with a
    message suggesting ``--base``.
    """
    from .peft_lora import without_adapter_name
    from .reference import has_reference_fields

    directory = Path(directory)
    if not directory.is_dir():
        raise PRoLoRAError("adapter folder not found" if not directory.exists() else "not a folder", str(directory))
    if not (directory / CONFIG_NAME).exists():
        hint = " (this looks like a model folder, not an adapter)" if (directory / "config.json").is_file() else ""
        raise PRoLoRAError(f"no {CONFIG_NAME}: not an adapter folder{hint}", str(directory))
    data = read_json(directory / CONFIG_NAME)
    if not isinstance(data, dict):
        raise PRoLoRAError(f"expected a JSON object, got {type(data).__name__}", str(directory / CONFIG_NAME))
    if data.get("format") == FORMAT_NAME:
        return PROLORA
    if has_reference_fields(data):
        shapes = tensor_shapes(directory / WEIGHTS_NAME)
        renamed = without_adapter_name(list(shapes), str(directory / WEIGHTS_NAME))
        shapes = {renamed[k]: v for k, v in shapes.items()}
        if any(n.endswith(("lora_A_vec", "lora_B_vec")) for n in shapes):
            return REFERENCE_TRAINING
        for name, shape in shapes.items():
            path, _, kind = name.removeprefix("base_model.model.").removesuffix(".weight").rpartition(".")
            if base_shapes and path in base_shapes and len(shape) == 2 and kind in ("lora_A", "lora_B"):
                d_in, d_out = base_shapes[path]
                if (shape[1] != d_in) if kind == "lora_A" else (shape[0] != d_out):
                    return REFERENCE_TRAINING  # a shard: narrower than the layer
        return REFERENCE_EXPANDED
    if data.get("peft_type") == "LORA":
        return PEFT_LORA
    raise PRoLoRAError(
        'unknown adapter format: expected a PRoLoRA adapter ("format": "prolora"), a PEFT LoRA adapter '
        '("peft_type": "LORA") or a reference PRoLoRA checkpoint (reduce_lora_A_x …); '
        f"got peft_type={data.get('peft_type')!r}",
        str(directory / CONFIG_NAME),
    )
