"""Serve two PRoLoRA adapters from one compact export in ONNX Runtime GenAI (og.Adapters).

    python examples/genai_two_adapters.py --base smollm2-135m --adapter A1 --adapter A2

exports BASE in compact mode with zero shard defaults (no active adapter = the base model) by the
route ``prolora-export onnx`` takes (the model builder's graph where it applies, else optimum's),
writes each adapter as an ``.onnx_adapter`` file, loads the folder with
``onnxruntime_genai.Model`` (it reads the export's genai_config.json) and generates one
prompt with no adapter and with each adapter active, through genai's own search loop.
Without --adapter, two random adapters of the demo geometry are made: they only show the switch
(their answers drift from the base's), train real ones for real answers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnxruntime_genai as og
import torch

from prolora_export.config import PRoLoRAConfig
from prolora_export.formats.prolora import Adapter, save_adapter
from prolora_export.inject import adapter_state_dict, inject_adapter
from prolora_export.models import load_base_model, resolve_model
from prolora_export.onnx.adapters import export_onnx_adapter
from prolora_export.onnx.genai import genai_model
from prolora_export.onnx.route import export_graph


def random_adapters(base: str, work: Path, count: int = 2) -> list[Path]:
    """Adapters with random shards (B is zero after init, which would hide the switch)."""
    paths = []
    for i in range(count):
        model = load_base_model(base)
        config = PRoLoRAConfig(r=8, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2, lora_dropout=0.0,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        inject_adapter(model, config)
        gen = torch.Generator().manual_seed(i)
        tensors = {k: torch.randn(v.shape, generator=gen) * 0.03 for k, v in adapter_state_dict(model).items()}
        paths.append(save_adapter(work / f"random{i}", Adapter(config, tensors), force=True))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--adapter", action="append", default=[], help="adapter folder (repeat; default: 2 random)")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--work", default=None, help="folder for the export and adapter files (default: a temp dir)")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="prolora-genai-"))
    adapters = [Path(a) for a in args.adapter] or random_adapters(args.base, work)
    graph = work / "compact"
    print(*export_graph(args.base, adapters[:1], graph, mode="compact", default_adapter="zero", force=True), sep="\n")

    model = genai_model(graph)  # og.Model, with the native RotatedShardLoRA kernel when it was built
    tokenizer = og.Tokenizer(model)
    loaded = og.Adapters(model)
    for i, adapter in enumerate(adapters):
        file = export_onnx_adapter(adapter, work / f"a{i}.onnx_adapter", graph=graph, force=True).out
        loaded.load(str(file), f"a{i}")

    chat = (Path(resolve_model(args.base)) / "chat_template.jinja").is_file()
    text = tokenizer.apply_chat_template(f'[{{"role": "user", "content": "{args.prompt}"}}]',
                                         add_generation_prompt=True) if chat else args.prompt
    prompt = tokenizer.encode(text)
    for name in [None, *(f"a{i}" for i in range(len(adapters)))]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + args.max_new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        if name is not None:
            generator.set_active_adapter(loaded, name)
        generator.append_tokens(prompt)
        while not generator.is_done():
            generator.generate_next_token()
        answer = tokenizer.decode(generator.get_sequence(0)[len(prompt):])
        print(f"{name or 'base':>5}: {answer!r}")


if __name__ == "__main__":
    main()
