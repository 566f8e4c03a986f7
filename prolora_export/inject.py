"""Attach PRoLoRA layers to any transformers model, and take them off again.

Target selection follows PEFT: a list of names matches a module whose path equals a
name or ends with ``.name``; a string is a regex that must match the whole path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .config import PRoLoRAConfig
from .errors import PRoLoRAError, raise_if
from .layer import SUPPORTED_LAYERS, PRoLoRALinear, layer_features


def target_matches(path: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


#: the ``target_modules`` value that selects every Linear/Conv1D layer but the output head (PEFT's name)
ALL_LINEAR = "all-linear"
#: names of fused projections (several of a block's projections computed by one layer)
FUSED_NAMES = ("qkv_proj", "gate_up_proj", "query_key_value", "c_attn", "W_pack", "Wqkv")


def selects_all_linear(targets: list[str] | str) -> bool:
    return targets == ALL_LINEAR or targets == [ALL_LINEAR]


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS)})


def _all_linear(model: nn.Module) -> dict[str, tuple[int, int]]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wrapped = {id(m.base_layer) for m in model.modules() if isinstance(m, PRoLoRALinear)}
    found = {
        path: layer_features(module)
        for path, module in model.named_modules()
        if path and isinstance(module, SUPPORTED_LAYERS) and module is not head and id(module) not in wrapped
    }
    if not found:
        raise PRoLoRAError(f"target_modules={ALL_LINEAR!r}: no Linear/Conv1D layer here besides the output head")
    return found


def find_targets(model: nn.Module, targets: list[str] | str) -> dict[str, tuple[int, int]]:
    """Module path -> (d_in, d_out) of every layer the targets select; errors name what went wrong.

    Every name of a list must select something: a name that matches nothing (a typo, or
    ``q_proj`` on a model whose attention is one fused ``qkv_proj``) is an error, not a
    silently smaller adapter.
    """
    if selects_all_linear(targets):
        return _all_linear(model)
    found: dict[str, tuple[int, int]] = {}
    unsupported = []
    for path, module in model.named_modules():
        if not path or isinstance(module, PRoLoRALinear) or not target_matches(path, targets):
            continue
        if isinstance(module, SUPPORTED_LAYERS):
            found[path] = layer_features(module)
        elif not any(True for _ in module.children()):
            unsupported.append(f"{path} ({type(module).__name__})")
    raise_if([f"target module {u} is not a Linear/Conv1D layer" for u in unsupported])
    names = _linear_names(model)
    if not found:
        raise PRoLoRAError(f"no module matches target_modules={targets!r}; linear layers here are named {names}")
    names_given = [] if isinstance(targets, str) else targets
    unmatched = [t for t in names_given if not any(target_matches(p, [t]) for p in found)]
    if unmatched:
        fused = [n for n in names if n in FUSED_NAMES and n not in targets]
        hint = (
            f"; {', '.join(fused)} {'is a fused projection' if len(fused) == 1 else 'are fused projections'}: "
            f"name {'it' if len(fused) == 1 else 'them'} to adapt each as one layer, or use {ALL_LINEAR}"
            if fused
            else ""
        )
        raise PRoLoRAError(
            f"target_modules {unmatched} matched no layer, so only part of what was asked would be adapted; "
            f"linear layers here are named {names}{hint}"
        )
    return found


def plan_adapter(model: nn.Module, config: PRoLoRAConfig) -> PRoLoRAConfig:
    """Fill ``config.modules`` from the layers ``config.target_modules`` selects in ``model`` (a
    model on the 'meta' device will do) and check the hyperparameters against their sizes.
    ``all-linear`` is recorded as the layer names it selected."""
    targets = find_targets(model, config.target_modules)
    if selects_all_linear(config.target_modules):
        config.target_modules = list(dict.fromkeys(path.rsplit(".", 1)[-1] for path in targets))
    config.modules = {p: {"in_features": i, "out_features": o} for p, (i, o) in targets.items()}
    return config.validate()


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def layer_problems(model: nn.Module, modules: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Every adapter module (``config.modules``) must be a Linear/Conv1D layer of ``model`` with the
    recorded in/out sizes; one message per module that is not, naming it. Sizes are read from what
    the layer is (a Conv1D stores its weight transposed), never guessed from the weight's shape."""
    problems = []
    for path, shape in modules.items():
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            problems.append(f"module '{path}' does not exist in the base model")
            continue
        if isinstance(layer, PRoLoRALinear):
            layer = layer.base_layer
        try:
            d_in, d_out = layer_features(layer)
        except PRoLoRAError as err:
            problems.append(f"module '{path}': {err}")
            continue
        if (d_in, d_out) != (shape["in_features"], shape["out_features"]):
            problems.append(
                f"module '{path}' is {d_in}→{d_out} in the base model but "
                f"{shape['in_features']}→{shape['out_features']} in the adapter (an adapter for another model?)"
            )
    return problems


def shared_weight_problems(model: nn.Module, paths: Iterable[str]) -> list[str]:
    """The one rule for merging ΔW into a base weight, in every command that merges (``merge``,
    ``onnx --mode merged``): refused when another module uses the same weight (an lm_head tied to
    the input embeddings, a layer registered under two paths), because the merge would change that
    module too, while the unmerged adapter (training, compact export, parity) changes the adapted
    layer only. One message per such layer, naming it and the modules it shares with."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, PRoLoRALinear):
            continue
        owner = name.removesuffix(".base_layer")
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(owner)
    tied = " (tie_word_embeddings=true)" if getattr(getattr(model, "config", None), "tie_word_embeddings", 0) else ""
    problems = []
    for path in paths:
        layer = model.get_submodule(path)
        weight = (layer.base_layer if isinstance(layer, PRoLoRALinear) else layer).weight
        others = sorted(set(owners.get(id(weight), [])) - {path})
        if others:
            problems.append(
                f"module '{path}' is tied to {', '.join(repr(o) for o in others)}: its weight is shared{tied}, so "
                "merging ΔW into it would change those modules too; use the unmerged adapter (onnx --mode "
                "compact) or train it without this layer"
            )
    return problems


def inject_adapter(model: nn.Module, config: PRoLoRAConfig) -> nn.Module:
    """Wrap each target layer in a freshly initialised :class:`PRoLoRALinear`; freeze everything else.

    When ``config.modules`` is non-empty it decides which layers are wrapped (an adapter
    being loaded); otherwise ``config.target_modules`` does and ``config.modules`` is filled in.
    """
    if config.modules:
        raise_if(layer_problems(model, config.modules))
        targets = {p: (s["in_features"], s["out_features"]) for p, s in config.modules.items()}
    else:
        plan_adapter(model, config)
        targets = config.modules
    for param in model.parameters():
        param.requires_grad_(False)
    for path in targets:
        base_layer = model.get_submodule(path)
        # the new layer takes the mode of the one it wraps: dropout stays off in an eval model
        _set_submodule(model, path, PRoLoRALinear(base_layer, config).train(base_layer.training))
    return model


def prolora_layers(model: nn.Module) -> Iterator[tuple[str, PRoLoRALinear]]:
    for path, module in model.named_modules():
        if isinstance(module, PRoLoRALinear):
            yield path, module


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"P.prolora_A_shard": tensor, …}``: exactly the keys of ``adapter_model.safetensors``."""
    return {
        f"{path}.{name}": tensor.detach()
        for path, layer in prolora_layers(model)
        for name, tensor in layer.adapter_tensors().items()
    }


@torch.no_grad()
def load_adapter_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors into the injected layers (shapes were checked by the file reader)."""
    for key, param in adapter_state_dict(model).items():
        param.copy_(tensors[key])


def remove_adapter(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the base layers back, with ΔW merged into them when ``merge`` is true (refused, before
    any weight changes, for a weight shared with another module: :func:`shared_weight_problems`)."""
    if merge:
        raise_if(shared_weight_problems(model, [path for path, _ in prolora_layers(model)]))
    for path, layer in list(prolora_layers(model)):
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        _set_submodule(model, path, layer.base_layer)
    return model


def set_merged(model: nn.Module, merged: bool) -> None:
    if merged:
        raise_if(shared_weight_problems(model, [path for path, _ in prolora_layers(model)]))
    for _, layer in prolora_layers(model):
        layer.merge() if merged else layer.unmerge()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of the model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def save_injected(model: nn.Module, config: PRoLoRAConfig, directory: str | Path, force: bool = False) -> Path:
    """Write the adapter of a model that :func:`inject_adapter` prepared (e.g. after a
    ``transformers.Trainer`` run) as our adapter folder."""
    from .formats.prolora import Adapter, save_adapter

    return save_adapter(directory, Adapter(config, dict(adapter_state_dict(model))), force=force)


def load_injected(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject the adapter folder ``directory`` into ``model`` with its trained weights."""
    from .formats.prolora import load_adapter

    adapter = load_adapter(directory)
    inject_adapter(model, adapter.config)
    load_adapter_weights(model, adapter.tensors)
    return model
