"""What costs SmolLM2 its quality under ONNX Runtime's quantizers: held-out loss of the merged demo export
(demo model + demo adapter) quantized one way at a time. Writes bench/QUANT-SENSITIVITY.md and
bench/quant_sensitivity.json.

    python bench/quant_sensitivity.py [--adapter DIR]

Variants (all blocks of 32 along K, asymmetric, ONNX Runtime's MatMulNBitsQuantizer unless said):

* activations: int8 ``quantize_dynamic`` (MatMulInteger: one activation scale per call, what this project
  used for int8 before) against 8-bit blocks with fp32 (accuracy level 0) or blockwise int8 activations
  (level 4); int4 at levels 0 and 4;
* weights: int4 everywhere with block 32 and 16; int4 on ONE kind of projection (or the lm_head, or a
  range of layers) with everything else fp32, which ranks what each costs;
* the product's settings: ``quantize_onnx`` int8, int4, and int4 with ``SENSITIVE_MODULES`` at int8.

Held-out loss: ``prolora_export.parity.heldout_loss`` on examples/data/eval.jsonl (ONNX Runtime, 2 threads).
The demo adapter: ``--adapter`` or runs/demo/adapter (``make demo``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from prolora_export.models import copy_model_side_files, ensure_demo_model  # noqa: E402
from prolora_export.onnx.export import export_onnx  # noqa: E402
from prolora_export.onnx.quant_settings import SENSITIVE_MODULES  # noqa: E402
from prolora_export.onnx.quantize import block_quantize, quantize_onnx  # noqa: E402
from prolora_export.parity import heldout_loss  # noqa: E402

DATA = ROOT / "examples" / "data" / "eval.jsonl"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
LAYER_RANGES = ((0, 3), (3, 27), (27, 30))


def ort_blocks(src: Path, dst: Path, bits: int, accuracy_level: int, block_size: int = 32,
               only: str | None = None) -> None:
    """ORT's MatMulNBitsQuantizer straight on a merged graph (``block_quantize``, no embedding); ``only``: a
    regex on node names, every other MatMul stays fp32."""
    model = onnx.load(str(src / "model.onnx"))
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and only and not re.search(only, n.name)]
    dst.mkdir()
    onnx.save(block_quantize(model, others, bits, block_size, accuracy_level, []), str(dst / "model.onnx"))
    copy_model_side_files(src, dst, overwrite=False)


def ort_dynamic(src: Path, dst: Path) -> None:
    """int8 quantize_dynamic: per-column int8 weights, activations quantized per call with one scale."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.mkdir()
    quantize_dynamic(src / "model.onnx", dst / "model.onnx", op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    copy_model_side_files(src, dst, overwrite=False)


def variants(src: Path) -> dict[str, tuple[str, Callable[[Path], None]]]:
    """name -> (what it is, how to make its folder)."""
    out: dict[str, tuple[str, Callable[[Path], None]]] = {
        "int8_dynamic": ("int8 quantize_dynamic (MatMulInteger, one activation scale per call)",
                         lambda d: ort_dynamic(src, d)),
        "int8_blocks_fp32_act": ("8-bit blocks, fp32 activations (level 0)", lambda d: ort_blocks(src, d, 8, 0)),
        "int8_blocks_int8_act": ("8-bit blocks, blockwise int8 activations (level 4)",
                                 lambda d: ort_blocks(src, d, 8, 4)),
        "int4_fp32_act": ("int4 everywhere, fp32 activations (level 0)", lambda d: ort_blocks(src, d, 4, 0)),
        "int4_int8_act": ("int4 everywhere, int8 activations (level 4)", lambda d: ort_blocks(src, d, 4, 4)),
        "int4_block16": ("int4 everywhere, blocks of 16", lambda d: ort_blocks(src, d, 4, 4, block_size=16)),
    }
    for name in PROJECTIONS:
        out[f"int4_only_{name}"] = (f"int4 on {name} only, the rest fp32",
                                    lambda d, name=name: ort_blocks(src, d, 4, 4, only=f"/{name}/"))
    for lo, hi in LAYER_RANGES:
        pattern = "layers\\.(" + "|".join(map(str, range(lo, hi))) + ")/"
        out[f"int4_only_layers_{lo}_{hi}"] = (f"int4 on layers {lo}–{hi - 1} only, the rest fp32",
                                              lambda d, p=pattern: ort_blocks(src, d, 4, 4, only=p))
    products = {
        "product_int8": ("quantize_onnx --bits 8", {"bits": 8}),
        "product_int4": ("quantize_onnx --bits 4 (with the int4 embedding)", {"bits": 4}),
        "product_int4mix": (f"quantize_onnx --bits 4 --int8-modules {','.join(SENSITIVE_MODULES)}",
                            {"bits": 4, "int8_modules": SENSITIVE_MODULES}),
    }
    for name, (label, kwargs) in products.items():
        out[name] = (label, lambda d, kwargs=kwargs: quantize_onnx(src, d, **kwargs))
    return out


def run(work: Path, adapter: Path) -> dict:
    started = time.perf_counter()
    demo = ensure_demo_model(quiet=True)
    src = work / "fp32"
    export_onnx(str(demo), adapter, src, mode="merged", force=True)
    results = {"adapter": str(adapter), "fp32": heldout_loss(src, DATA, threads=2), "variants": {}}
    print(f"fp32 {results['fp32']:.4f}", flush=True)
    for name, (label, make) in variants(src).items():
        folder = work / name
        make(folder)
        loss = heldout_loss(folder, DATA, threads=2)
        results["variants"][name] = {"label": label, "loss": loss, "ratio": loss / results["fp32"]}
        print(f"{name:28s} {loss:.4f}  {loss / results['fp32']:.3f}", flush=True)
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    results["seconds"] = time.perf_counter() - started
    return results


def markdown(r: dict) -> str:
    rows = "\n".join(f"| {v['label']} | {v['loss']:.4f} | {v['ratio']:.3f} |" for v in r["variants"].values())
    return f"""## Which part of the quantization costs SmolLM2 its quality

Command: `python bench/quant_sensitivity.py` ({r['seconds'] / 60:.1f} min). Merged demo export (SmolLM2-135M-Instruct
+ the demo adapter, {r['adapter']}), held-out loss per labelled token on examples/data/eval.jsonl through
ONNX Runtime; fp32: {r['fp32']:.4f}. Blocks of 32 along K, asymmetric, unless the row says otherwise.

| variant | held-out loss | / fp32 |
|---|---:|---:|
{rows}

Reading: int8 is harmless in blocks and harmful with one activation scale per call (SmolLM2 carries a few
huge activations), so `--bits 8` writes 8-bit MatMulNBits. int4's loss is the weights' rounding, not the
activations' (levels 0 and 4 agree) nor the lm_head; it is spread over the layers and largest in v_proj,
down_proj, up_proj and q_proj (`--int8-modules` keeps named projections at 8 bits; SENSITIVE_MODULES were
chosen earlier with a random adapter, where o_proj ranked above up_proj). (SmolLM2 here is the
dequantized Q4_1 GGUF of MODELS.md: its weights already sit on a 4-bit grid whose offsets ORT's integer
zero points cannot reproduce, so int4 re-rounds every weight.)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=ROOT / "runs" / "demo" / "adapter")
    parser.add_argument("--markdown-only", action="store_true")
    args = parser.parse_args()
    path = HERE / "quant_sensitivity.json"
    if not args.markdown_only:
        if not (args.adapter / "adapter_model.safetensors").is_file():
            parser.error(f"no adapter at {args.adapter}: run `make demo` or give --adapter")
        with tempfile.TemporaryDirectory(prefix="bench-quant-sensitivity-") as tmp:
            path.write_text(json.dumps(run(Path(tmp), args.adapter), indent=2) + "\n")
    (HERE / "QUANT-SENSITIVITY.md").write_text(markdown(json.loads(path.read_text())))
    print((HERE / "QUANT-SENSITIVITY.md").read_text())


if __name__ == "__main__":
    main()
