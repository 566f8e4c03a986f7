"""Serve several PRoLoRA adapters from ONE ONNX Runtime session of a compact graph.

    python examples/serve_many_adapters.py --base smollm2-135m --adapter A1 --adapter A2

exports BASE with the first adapter in compact mode and ``--default-adapter zero`` (so no
active adapter = the base model) by the route ``prolora-export onnx`` takes (the model builder's graph
where it applies, else optimum's; ``--graph`` picks one), writes every adapter as an ``.onnx_adapter`` file, then
runs one prompt through one InferenceSession with each adapter active in turn and with
none, and compares each result with PyTorch (base + that adapter, or the base alone).
Exits 1 if any logits differ by more than --tol (relative to the largest logit).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from prolora_export.formats.prolora import load_adapter
from prolora_export.inject import inject_adapter, load_adapter_weights
from prolora_export.models import load_base_model, load_config
from prolora_export.onnx.adapters import (
    decoder_feeds,
    export_onnx_adapter,
    load_onnx_adapter,
    run_options,
)
from prolora_export.onnx.route import export_graph
from prolora_export.runtime import inference_session


def torch_logits(base: str, adapter: str | None, ids: np.ndarray) -> np.ndarray:
    model = load_base_model(base)
    if adapter is not None:
        loaded = load_adapter(adapter)
        inject_adapter(model, loaded.config)
        load_adapter_weights(model, loaded.tensors)
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--adapter", action="append", required=True, help="PRoLoRA adapter folder (repeat)")
    parser.add_argument("--work", default=None, help="folder for the graph and adapter files (default: a temp dir)")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--graph", choices=["auto", "builder", "optimum"], default="auto",
                        help="who writes the graph (prolora-export onnx --graph)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="prolora-serve-"))

    graph = work / "compact"
    print(*export_graph(args.base, args.adapter[:1], graph, graph=args.graph, mode="compact", default_adapter="zero",
                        force=True), sep="\n")
    files = [
        # made for this graph: a geometry that differs is refused, a lora_alpha that differs is folded in
        export_onnx_adapter(a, work / f"adapter{i}.onnx_adapter", force=True, graph=graph).out
        for i, a in enumerate(args.adapter)
    ]

    session = inference_session(graph)  # errors-only logging: ORT warns once per overridable shard
    ids = np.array([[1, 42, 7, 99, 3, 15, 8, 64]], dtype=np.int64) % session.get_outputs()[0].shape[-1]
    feeds = decoder_feeds(session, ids, load_config(args.base))  # the config sizes a builder graph's symbolic cache

    worst = 0.0
    runs = [("base (no adapter)", None, None), *zip(args.adapter, args.adapter, files, strict=True)]
    for name, adapter, file in runs:
        active = [load_onnx_adapter(file, graph=session)] if file else []  # checked to fit the session's graph
        got = session.run(["logits"], feeds, run_options(*active))[0]
        want = torch_logits(args.base, adapter, ids)
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        worst = max(worst, rel)
        print(f"{name}: max |ONNX − PyTorch| / max |logit| = {rel:.2e}, next token {int(got[0, -1].argmax())}")
    print(f"one session, {len(files)} adapters + base: worst relative difference {worst:.2e} (tolerance {args.tol})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
