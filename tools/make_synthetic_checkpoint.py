"""Write a random Llama checkpoint of any size (sharded safetensors + index + config.json)
and a matching random PRoLoRA adapter, for benchmarking the streaming merge.

The model is never held in memory: tensors are generated one shard at a time and each
shard is written and freed before the next, so a 10 GB checkpoint needs ~one shard of RAM.

    python tools/make_synthetic_checkpoint.py --size 2.5GB --max-shard-size 500MB --out /tmp/llama-2.5g
    python tools/make_synthetic_checkpoint.py --hidden 512 --layers 4 --out /tmp/small --adapter /tmp/small-adapter
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from prolora_export.config import PRoLoRAConfig
from prolora_export.formats.prolora import Adapter, expected_shapes, save_adapter
from prolora_export.outputs import atomic_output_dir

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_size(text: str) -> int:
    """'2.5GB' / '500MB' / '1GiB' / '123' -> bytes (decimal units, like transformers' max_shard_size)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2.5GB, 500MB)")
    base = 1024 if match.group(3) else 1000
    return int(float(match.group(1)) * base ** " KMGT".index(match.group(2).upper() or " "))


def llama_shapes(args: argparse.Namespace, layers: int, tied: bool):
    """(name, shape) of every tensor of LlamaForCausalLM, in the order transformers saves them."""
    hidden, intermediate, vocab = args.hidden, args.intermediate, args.vocab
    kv = args.kv_heads * (hidden // args.heads)
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}"
        yield f"{p}.self_attn.q_proj.weight", (hidden, hidden)
        yield f"{p}.self_attn.k_proj.weight", (kv, hidden)
        yield f"{p}.self_attn.v_proj.weight", (kv, hidden)
        yield f"{p}.self_attn.o_proj.weight", (hidden, hidden)
        yield f"{p}.mlp.gate_proj.weight", (intermediate, hidden)
        yield f"{p}.mlp.up_proj.weight", (intermediate, hidden)
        yield f"{p}.mlp.down_proj.weight", (hidden, intermediate)
        yield f"{p}.input_layernorm.weight", (hidden,)
        yield f"{p}.post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    if not tied:
        yield "lm_head.weight", (vocab, hidden)


def layers_for_size(args: argparse.Namespace, itemsize: int) -> int:
    """Number of layers that brings the checkpoint closest to ``args.size`` bytes (at least 1)."""
    one = sum(math.prod(s) for _, s in llama_shapes(args, 1, args.tied))
    two = sum(math.prod(s) for _, s in llama_shapes(args, 2, args.tied))
    per_layer, fixed = two - one, 2 * one - two
    return max(1, round((args.size / itemsize - fixed) / per_layer))


def write_checkpoint(args: argparse.Namespace) -> dict:
    dtype = DTYPES[args.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    layers = args.layers
    if args.size:
        layers = layers_for_size(args, itemsize)
    shapes = list(llama_shapes(args, layers, args.tied))
    # partition into shards first (names need the count), like transformers: start a new shard when full
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * itemsize
        if groups[-1] and filled + nbytes > args.max_shard_size:
            groups.append([])
            filled = 0
        groups[-1].append((name, shape))
        filled += nbytes
    gen = torch.Generator().manual_seed(args.seed)
    weight_map: dict[str, str] = {}
    with atomic_output_dir(args.out, force=args.force) as tmp:
        for k, group in enumerate(groups, 1):
            file = f"model-{k:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
            tensors = {}
            for name, shape in group:
                if len(shape) == 1:
                    tensors[name] = torch.ones(shape, dtype=dtype)
                else:
                    tensors[name] = torch.empty(shape, dtype=dtype).uniform_(-0.04, 0.04, generator=gen)
                weight_map[name] = file
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            print(f"  wrote {file} ({sum(t.numel() * itemsize for t in tensors.values()) / 1e6:.0f} MB)", flush=True)
            del tensors
        total = sum(math.prod(s) for _, s in shapes) * itemsize
        if len(groups) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        from transformers import LlamaConfig

        config = LlamaConfig(
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            vocab_size=args.vocab,
            tie_word_embeddings=args.tied,
            torch_dtype=args.dtype.replace("fp", "float").replace("bf16", "bfloat16"),
            architectures=["LlamaForCausalLM"],
        )
        config.save_pretrained(tmp)
    return {"layers": layers, "shards": len(groups), "bytes": total}


def write_adapter(args: argparse.Namespace, layers: int) -> None:
    """A random PRoLoRA adapter on every linear layer of the synthetic model (B non-zero)."""
    kv = args.kv_heads * (args.hidden // args.heads)
    dims = {
        "q_proj": (args.hidden, args.hidden),
        "k_proj": (args.hidden, kv),
        "v_proj": (args.hidden, kv),
        "o_proj": (args.hidden, args.hidden),
        "gate_proj": (args.hidden, args.intermediate),
        "up_proj": (args.hidden, args.intermediate),
        "down_proj": (args.intermediate, args.hidden),
    }
    modules = {
        f"model.layers.{i}.{'self_attn' if t.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{t}": {
            "in_features": dims[t][0],
            "out_features": dims[t][1],
        }
        for i in range(layers)
        for t in TARGETS
    }
    config = PRoLoRAConfig(r=args.rank, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2, target_modules=list(TARGETS))
    config.modules = modules
    gen = torch.Generator().manual_seed(args.seed + 1)
    tensors = {k: torch.randn(s, generator=gen) * 0.02 for k, s in expected_shapes(config).items()}
    save_adapter(args.adapter, Adapter(config, tensors), force=args.force)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--adapter", type=Path, help="also write a matching random PRoLoRA adapter here")
    parser.add_argument("--size", type=parse_size, help="target checkpoint size (e.g. 2.5GB); sets --layers")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tied", action="store_true", help="tie lm_head to the embeddings (not stored)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("500MB"))
    parser.add_argument("--rank", type=int, default=16, help="adapter rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    args = parser.parse_args()
    info = write_checkpoint(args)
    print(f"{args.out}: {info['layers']} layers, {info['shards']} shard(s), {info['bytes'] / 1e9:.2f} GB")
    if args.adapter:
        write_adapter(args, info["layers"])
        print(f"{args.adapter}: random PRoLoRA adapter (r={args.rank}) on {len(TARGETS)}×{info['layers']} layers")


if __name__ == "__main__":
    main()
