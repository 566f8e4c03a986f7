"""Options several commands share, defined once: the PRoLoRA hyperparameters under ``train``'s
names, and how an adapter folder may be read (every command that takes one reads it through
:func:`prolora_export.formats.detect.read_adapter`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

#: train's defaults; commands that read an adapter take the same options with no default (= not stated)
TRAIN_DEFAULTS = {"r": 8, "unshared_r": 1, "sharing_rate_a": 2, "sharing_rate_b": 2, "rotate": True}
_HELP = {
    "r": "Total rank r.",
    "unshared_r": "Unshared rank u (u = r is plain LoRA).",
    "sharing_rate_a": "m: chunks A is split into along d_in.",
    "sharing_rate_b": "n: chunks B is split into along d_out.",
    "rotate": "Rotation enhancement (--no-rotate: plain shared chunks, the paper's CLoRA ablation).",
    "stride_a": "Base stride s_A (default max(floor((r - u) / m), 1)).",
    "stride_b": "Base stride s_B (default max(floor((r - u) / n), 1)).",
}
#: a reader takes a stride as the reference writes it: any integer, meaningful modulo r - u
READ_STRIDE = " Taken modulo r - u, as the reference writes strides (r - u when m = 1)."
STATED = (
    " For an adapter folder that does not record it (a reference checkpoint): state it; it is checked "
    "against the tensors."
)


def hyperparameter_options(defaults: dict[str, Any] | None = None) -> Callable[[Callable], Callable]:
    """``--r --unshared-r --sharing-rate-a --sharing-rate-b --rotate/--no-rotate --stride-a --stride-b``.

    With ``defaults`` (``train``) they set the values. Without, each defaults to None: not stated,
    which a reader then infers from the files. Plain ints: the config's validation (or the check
    against the tensors) words what is wrong with a value, the same way for every command.
    """
    given = defaults or {}

    def value(key: str) -> dict[str, Any]:
        if key in given:
            return {"default": given[key], "show_default": True, "help": _HELP[key]}
        extra = (" In [0, r - u)." if defaults else READ_STRIDE) if key.startswith("stride") else ""
        return {"default": None, "help": _HELP[key] + extra + ("" if defaults else STATED)}

    options = [
        click.option("--r", "r", type=int, **value("r")),
        click.option("--unshared-r", type=int, **value("unshared_r")),
        click.option("--sharing-rate-a", type=int, **value("sharing_rate_a")),
        click.option("--sharing-rate-b", type=int, **value("sharing_rate_b")),
        click.option("--rotate/--no-rotate", **value("rotate")),
        click.option("--stride-a", type=int, **value("stride_a")),
        click.option("--stride-b", type=int, **value("stride_b")),
    ]

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def adapter_read_options(command: Callable) -> Callable:
    """The hyperparameters (stated, not set) plus ``--allow-pickle`` and ``--prefer``, handed to the
    command as one ``read_options`` (:class:`~prolora_export.formats.reference.ReadOptions`)."""

    @functools.wraps(command)
    def run(*args, allow_pickle: bool, prefer: str | None, **kwargs):
        from ..formats.reference import HYPERPARAMETERS, ReadOptions

        stated = {k: kwargs.pop(k) for k in HYPERPARAMETERS}
        return command(*args, read_options=ReadOptions(**stated, allow_pickle=allow_pickle, prefer=prefer), **kwargs)

    run = click.option(
        "--prefer",
        type=click.Choice(["bin", "safetensors"]),
        default=None,
        help="When the folder holds adapter_model.bin and adapter_model.safetensors and they disagree "
        "(the reference's final folder), use this one.",
    )(run)
    run = click.option(
        "--allow-pickle",
        is_flag=True,
        help="Read adapter_model.bin (pickle) through torch.load(weights_only=True): tensors only, no code "
        "runs. Off by default.",
    )(run)
    return hyperparameter_options()(run)


def quantization_options(command: Callable) -> Callable:
    """``--block-size --accuracy-level --int8-modules`` of ``quantize`` and ``onnx --quantize``, the module
    list handed to the command as a tuple (``int8_modules``)."""
    from ..onnx.quant_settings import ACCURACY_LEVELS, DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, SENSITIVE_MODULES

    @functools.wraps(command)
    def run(*args, int8_modules: str | None, **kwargs):
        modules = tuple(m.strip() for m in int8_modules.split(",")) if int8_modules else ()
        return command(*args, int8_modules=modules, **kwargs)

    run = click.option(
        "--int8-modules", default=None, metavar="NAMES",
        help="int4 only: comma-separated projections kept at int8 (8-bit blocks), matched against the "
             f"MatMul node names, e.g. {','.join(SENSITIVE_MODULES)} (demo model: held-out loss 1.76x fp32 "
             "instead of 2.27x, folder 0.245x instead of 0.207x of fp32).",
    )(run)
    run = click.option(
        "--accuracy-level", type=click.IntRange(min(ACCURACY_LEVELS), max(ACCURACY_LEVELS)),
        default=DEFAULT_ACCURACY_LEVEL, show_default=True,
        help="Compute type of MatMulNBits' activations: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 in blocks "
             "(fastest on CPU; same quality as fp32 on the demo model).",
    )(run)
    return click.option(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, show_default=True,
        help="Weights per scale along K (a power of two ≥ 16); smaller is more accurate and larger.",
    )(run)
