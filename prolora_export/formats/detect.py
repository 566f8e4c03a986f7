"""The one adapter reader: every command that takes an adapter folder calls :func:`read_adapter`.

It tells the layout from the config and the tensors (ours, PEFT LoRA, the reference's training
or expanded layout, SPEC §2–§3), reads the weights file(s), infers what the folder does not say
(:mod:`.reference`) and returns the adapter with where each hyperparameter came from.

Pickle (``adapter_model.bin``) is read only with ``allow_pickle``, and then only through
``torch.load(weights_only=True)``: tensors and plain containers, no code runs. When a folder
holds both files (the reference's final folder: training layout in safetensors, expanded in the
pickle) both are read when allowed and compared; a disagreement needs ``prefer``.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import CONFIG_NAME, FORMAT_NAME, WEIGHTS_NAME, read_json
from ..errors import PRoLoRAError
from .peft_lora import PICKLE_NAME, lora_factors, lora_keys, read_lora_config
from .prolora import Adapter, load_adapter, read_safetensors
from .reference import (
    FROM_FILES,
    HYPERPARAMETERS,
    Inference,
    ReadOptions,
    is_training_layout,
    read_expanded,
    read_training,
)

PROLORA = "prolora"
PEFT_LORA = "peft-lora"
REFERENCE_TRAINING = "reference-training"
REFERENCE_EXPANDED = "reference-expanded"
FORMATS = (PROLORA, PEFT_LORA, REFERENCE_TRAINING, REFERENCE_EXPANDED)
PREFER = ("bin", "safetensors")

Shapes = dict[str, tuple[int, int]]


@dataclass
class ReadResult:
    """An adapter as read, its layout, the file it came from and the provenance of its hyperparameters."""

    format: str
    adapter: Adapter
    inference: Inference
    source: Path


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save`` file of tensors, through ``torch.load(weights_only=True)`` only: a pickle that
    would build anything but tensors and plain containers (run code) is refused before it runs."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PRoLoRAError(
            f"refused: not a plain file of tensors (torch.load with weights_only=True says: {first})", str(path)
        ) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
        raise PRoLoRAError("expected a dict of tensor names to tensors", str(path))
    return data


def _base_shapes(sizes: Shapes | Callable[[], Shapes] | None) -> Shapes | None:
    return sizes() if callable(sizes) else sizes


def read_adapter(
    directory: str | Path,
    options: ReadOptions | None = None,
    sizes: Shapes | Callable[[], Shapes] | None = None,
    compact: bool = False,
) -> ReadResult:
    """Read any supported adapter folder (see the module doc).

    ``sizes``: the base model's layer sizes (path -> (d_in, d_out)), or a function giving them, called
    only for a folder that is not ours. ``compact``: the caller needs shards (convert to PRoLoRA), so a
    genuine plain LoRA is refused instead of being read as u = r.
    """
    options = options or ReadOptions()
    if options.prefer is not None and options.prefer not in PREFER:
        raise PRoLoRAError(f"--prefer must be one of {', '.join(PREFER)}, got {options.prefer!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise PRoLoRAError("adapter folder not found" if not directory.exists() else "not a folder", str(directory))
    if not (directory / CONFIG_NAME).exists():
        hint = " (this looks like a model folder, not an adapter)" if (directory / "config.json").is_file() else ""
        raise PRoLoRAError(f"not an adapter folder: {CONFIG_NAME} file not found{hint}", str(directory))
    data = read_json(directory / CONFIG_NAME)
    if not isinstance(data, dict):
        raise PRoLoRAError(f"expected a JSON object, got {type(data).__name__}", str(directory / CONFIG_NAME))
    if data.get("format") == FORMAT_NAME:
        return _ours(directory, options)
    if data.get("peft_type") != "LORA":
        raise PRoLoRAError(
            'unknown adapter format: expected a PRoLoRA adapter ("format": "prolora"), a PEFT LoRA adapter or a '
            'reference PRoLoRA checkpoint (both "peft_type": "LORA"); '
            f"got peft_type={data.get('peft_type')!r}",
            str(directory / CONFIG_NAME),
        )
    data = read_lora_config(directory)
    files = _weights(directory, options)
    notes: list[str] = []
    if (directory / PICKLE_NAME).is_file() and "bin" not in files:
        notes.append(f"{PICKLE_NAME} not read (pickle): pass --allow-pickle to read and compare it")
    base = _base_shapes(sizes)
    results: dict[str, ReadResult] = {}
    failures: dict[str, PRoLoRAError] = {}
    for name in sorted(files, key=lambda n: not is_training_layout(list(files[n][1]))):  # training first
        path, tensors = files[name]
        # the training layout's vec shapes give the layer sizes the expanded one may lack
        known, known_from = base, "--base"
        if known is None and "safetensors" in results and results["safetensors"].format == REFERENCE_TRAINING:
            config = results["safetensors"].adapter.config
            known = {p: (s["in_features"], s["out_features"]) for p, s in config.modules.items()}
            known_from = f"the lora_*_vec shapes of {WEIGHTS_NAME}"
        try:
            # with two files the one not chosen may be plain LoRA: compactness is asked of the chosen one
            results[name] = _read_tensors(path, tensors, data, options, known, known_from, compact and len(files) == 1)
        except PRoLoRAError as err:
            if options.prefer is None or options.prefer == name or len(files) == 1:
                raise
            failures[name] = err
    chosen = _choose(results, failures, options, notes)
    if compact and chosen.format == PEFT_LORA:  # refused with the reason (no chunk structure)
        path, tensors = files["bin" if chosen.source.name == PICKLE_NAME else "safetensors"]
        _read_tensors(path, tensors, data, options, base, "--base", compact=True)
    chosen.inference.notes[:0] = notes
    return chosen


def _ours(directory: Path, options: ReadOptions) -> ReadResult:
    """Our own folder: every value is in the file; stated options must agree with it."""
    adapter = load_adapter(directory)
    config = adapter.config
    info = Inference()
    for key in HYPERPARAMETERS:
        info.set(key, getattr(config, key), FROM_FILES)
    for key, value in options.stated().items():
        if key.startswith("stride") and config.shared_r > 0:
            g = config.module_geometry(next(iter(config.modules)))
            have = getattr(g, key) % config.shared_r
            value = value % config.shared_r
        else:
            have = getattr(config, key)
        if have != value:
            raise PRoLoRAError(
                f"--{key.replace('_', '-')} {value} contradicts {CONFIG_NAME}, which says {have}", str(directory)
            )
    return ReadResult(PROLORA, adapter, info, directory / WEIGHTS_NAME)


def _weights(directory: Path, options: ReadOptions) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """The weights files to read: name -> (path, tensors with PEFT prefix and adapter name removed)."""
    found = {}
    safetensors, pickled = directory / WEIGHTS_NAME, directory / PICKLE_NAME
    if safetensors.is_file():
        found["safetensors"] = (safetensors, lora_keys(read_safetensors(safetensors), str(safetensors)))
    if pickled.is_file() and options.allow_pickle:
        found["bin"] = (pickled, lora_keys(read_pickle(pickled), str(pickled)))
    elif pickled.is_file() and not found:
        raise PRoLoRAError(
            f"only a pickle {PICKLE_NAME}: it is not read by default because unpickling can run code; pass "
            "--allow-pickle to read its tensors safely (torch.load with weights_only=True)",
            str(directory),
        )
    if not found:
        raise PRoLoRAError(f"no {WEIGHTS_NAME} (nor {PICKLE_NAME})", str(directory))
    return found


def _read_tensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    data: dict,
    options: ReadOptions,
    sizes: Shapes | None,
    sizes_from: str,
    compact: bool,
) -> ReadResult:
    if is_training_layout(list(tensors)):
        adapter, info = read_training(tensors, data, options, sizes, str(path))
        return ReadResult(REFERENCE_TRAINING, adapter, info, path)
    lora = lora_factors(tensors, data, str(path))
    adapter, info, structured = read_expanded(
        lora, options, sizes, str(path), compact, sizes_from, pickled=path.name == PICKLE_NAME
    )
    return ReadResult(REFERENCE_EXPANDED if structured else PEFT_LORA, adapter, info, path)


def _same_adapter(first: Adapter, second: Adapter) -> str | None:
    """None when both give bitwise the same full A and B in every layer, else the first module that differs."""
    if set(first.config.modules) != set(second.config.modules):
        return "they adapt different modules"
    for path in sorted(first.config.modules):
        if first.config.modules[path] != second.config.modules[path]:
            return f"module '{path}' has different sizes"
        dtype = first.tensors[next(k for k in first.tensors if k.startswith(path + "."))].dtype
        (b1, a1), (b2, a2) = first.factors(path, dtype), second.factors(path, dtype)
        if not (torch.equal(a1, a2) and torch.equal(b1, b2)):
            return f"module '{path}' differs"
    return None


def _choose(
    results: dict[str, ReadResult], failures: dict[str, PRoLoRAError], options: ReadOptions, notes: list[str]
) -> ReadResult:
    """One file's reading; with both files, say how they relate and refuse an unresolved disagreement."""
    if len(results) + len(failures) == 1:
        return next(iter(results.values()))
    if failures:
        (name, err), = failures.items()
        notes.append(f"the {name} file could not be read as an adapter ({err}); using the other (--prefer)")
        return next(iter(results.values()))
    st, pk = results["safetensors"], results["bin"]
    layouts = f"{WEIGHTS_NAME} holds the {st.format} layout, {PICKLE_NAME} the {pk.format} layout"
    difference = _same_adapter(st.adapter, pk.adapter)
    if difference is None:
        chosen = results[options.prefer or "safetensors"]
        notes.append(f"{layouts}; they agree bitwise (same A and B in every layer): using {chosen.source.name}")
        if chosen is st and st.format == REFERENCE_TRAINING:
            chosen.inference.notes = [n for n in chosen.inference.notes if "not verifiable" not in n]
            notes.append(f"rotation and strides verified against {PICKLE_NAME}")
        return chosen
    if options.prefer is None:
        raise PRoLoRAError(
            f"the two weights files disagree: {layouts}, and {difference}; choose one with "
            "--prefer bin or --prefer safetensors",
            str(st.source.parent),
        )
    notes.append(f"{layouts}; they disagree ({difference}): using {options.prefer} (--prefer)")
    return results[options.prefer]
