"""What a weight quantization may be asked for: the bits, block sizes and accuracy levels ONNX Runtime's
MatMulNBits takes, their defaults, and the one check of them that ``quantize``, ``onnx --quantize`` and the
model builder's int4/int8 route share (a leaf: the CLI reads its choices from here without importing onnx)."""

from __future__ import annotations

from ..errors import PRoLoRAError

#: CLI spelling -> bits (None: no quantization)
QUANTIZE = {"none": None, "int8": 8, "int4": 4}
BITS = (4, 8)
#: projections an int4 graph keeps at int8 with --int8-modules (module doc): on the demo model 0.245x the fp32
#: folder instead of 0.207x, held-out loss 1.76x fp32 instead of 2.27x (bench/QUANT.md)
SENSITIVE_MODULES = ("v_proj", "o_proj", "down_proj")
DEFAULT_BLOCK_SIZE = 32
#: MatMulNBits ``accuracy_level``: 0 unset (= fp32), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_ACCURACY_LEVEL = 4


def check_settings(bits: int, block_size: int, accuracy_level: int, int8_modules: tuple[str, ...] = ()) -> None:
    """One clear line for settings ONNX Runtime would reject (or assert on) later."""
    if bits not in BITS:
        raise PRoLoRAError(f"unsupported bits {bits} (expected 4 or 8)", "--bits")
    if int8_modules and bits != 4:
        raise PRoLoRAError("only an int4 graph keeps some modules at int8 (every MatMul of an int8 graph is int8)",
                           "--int8-modules")
    if any(not m or "/" in m for m in int8_modules):
        raise PRoLoRAError(f"module names like v_proj,down_proj expected (got {','.join(int8_modules)!r})",
                           "--int8-modules")
    if block_size < 16 or block_size & (block_size - 1):
        raise PRoLoRAError(f"must be a power of two ≥ 16 (got {block_size})", "--block-size")
    if accuracy_level not in ACCURACY_LEVELS:
        raise PRoLoRAError(f"must be one of {', '.join(map(str, ACCURACY_LEVELS))} (got {accuracy_level})",
                           "--accuracy-level")
