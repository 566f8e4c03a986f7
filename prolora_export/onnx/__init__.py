"""ONNX export of base + PRoLoRA adapter (merged, or compact with the ``ai.prolora`` op) and
ONNX Runtime adapter files. See SPEC §4."""
