"""Folders written the way the paper's own code (Forence1999/PRoLoRA, an open-instruct fork) writes
them, and that code's forward pass in float64, for tests. Written from SPEC §3 and a reading of its
``modules/chunkwise_sharing_LoRA.py`` / ``finetune_trainer.py``; independent of ``prolora_export``.

What the reference does, step by step:

* its trainable tensors per layer (PEFT key ``base_model.model.<P>.…``, adapter name removed):
  ``lora_A.weight`` (r_s × c_A), ``lora_B.weight`` (c_B × r_s), ``lora_A_vec`` (u × d_in),
  ``lora_B_vec`` (u × d_out), in that order, float32, zero-size where u = 0 or u = r;
* its strides: ``max(floor(r_s / m), 1)`` (so r_s when m = 1, 1 when r_s = 0); rotation always on
  (its entry point asserts it; ``rotate=False`` here is the code path behind that assert);
* ``Trainer`` saves (``checkpoint-N/`` and the final folder): PEFT's ``save_pretrained``, a plain
  ``LoraConfig`` JSON (PEFT 0.6.2: sorted keys, indent 2) and, with transformers ≥ 4.35,
  ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``), else ``adapter_model.bin``;
* then ``save_chunk_lora`` ``torch.save``s, over ``adapter_model.bin``, a dict of only the expanded
  ``lora_A.weight`` (r × L) / ``lora_B.weight`` (L × r), L = min(m·c, cut) with cut = 4096 for
  q/k/v/o and gate/up inputs (q/k/v/o and down outputs), 11008 otherwise: Llama-2-7B's sizes. Its
  tensors are views (transposes, slices) of the buffers the expansion built, saved as such. With
  u > 0 it concatenates the unshared part, which crashes unless L = d (the layer size).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."
LLAMA_NAMES = ["q_proj", "o_proj", "v_proj", "k_proj", "gate_proj", "up_proj", "down_proj"]
#: the names whose input (A) or output (B) the reference cuts at 4096; every other layer at 11008
CUT_4096_A = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj")
CUT_4096_B = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")


class ReferenceCrash(Exception):
    """The reference's own save would raise here (torch.cat of mismatched sizes)."""


@dataclass
class RefRun:
    """One reference training run's hyperparameters (its names in comments)."""

    r: int  # lora_r
    u: int  # unshared_r
    m: int  # reduce_lora_A_x
    n: int  # reduce_lora_B_x
    alpha: float = 16.0  # lora_alpha
    rotate: bool = True  # enable_lora_rotation

    @property
    def shared_r(self) -> int:
        return self.r - self.u

    @property
    def shift_a(self) -> int:  # lora_A_shift_size
        return max(math.floor(self.shared_r / self.m), 1)

    @property
    def shift_b(self) -> int:  # lora_B_shift_size
        return max(math.floor(self.shared_r / self.n), 1)


def linear_sizes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Module path -> (d_in, d_out) of every Llama projection of ``model``, in module order."""
    return {
        p: (mod.in_features, mod.out_features)
        for p, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and p.rsplit(".", 1)[-1] in LLAMA_NAMES
    }


def trained_state(sizes: dict[str, tuple[int, int]], run: RefRun, seed: int = 0) -> dict[str, torch.Tensor]:
    """The reference's trainable tensors after 'training' (random, B non-zero), as PEFT names them."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for path, (d_in, d_out) in sizes.items():
        c_a, c_b = math.ceil(d_in / run.m), math.ceil(d_out / run.n)
        shapes = {
            "lora_A.weight": (run.shared_r, c_a),
            "lora_B.weight": (c_b, run.shared_r),
            "lora_A_vec": (run.u, d_in),
            "lora_B_vec": (run.u, d_out),
        }
        for name, shape in shapes.items():
            state[f"{PREFIX}{path}.{name}"] = (torch.rand(shape, generator=gen) - 0.5) / math.sqrt(d_in)
    return state


def peft_config(run: RefRun, base: str = "meta-llama/Llama-2-7b-hf") -> dict:
    """``adapter_config.json`` as PEFT 0.6.2's ``LoraConfig.save_pretrained`` writes the reference's config."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": run.alpha,
        "lora_dropout": 0.1,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": run.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": ["q_proj", "o_proj", "v_proj", "k_proj", "gate_proj", "up_proj", "down_proj"],
        "task_type": "CAUSAL_LM",
    }


def _expand(chunk: torch.Tensor, rate: int, rotate: bool, shift: int, length: int, vec: torch.Tensor):
    """What the reference's expansion returns for one factor: (L × r), as a view where it is one."""
    if 0 in chunk.shape:
        return vec.t()
    pieces = [torch.roll(chunk, -j * shift, 0) if rotate else chunk for j in range(rate)]
    full = torch.cat(pieces, dim=1).t()[:length]  # a transposed, sliced view of the (r_s × rate·c) buffer
    if 0 in vec.shape:
        return full
    if full.shape[0] != vec.shape[1]:
        raise ReferenceCrash(f"cat of {tuple(full.shape)} and {tuple(vec.t().shape)}")
    return torch.cat([full, vec.t()], dim=1)


def expanded_state(state: dict[str, torch.Tensor], run: RefRun) -> dict[str, torch.Tensor]:
    """``save_chunk_lora``'s dict: the expanded lora_A.weight / lora_B.weight only, in state order."""
    out = {}
    for key, value in state.items():
        if "lora_A.weight" in key:
            cut = 4096 if any(name in key for name in CUT_4096_A) else 11008
            vec = state[key.replace("lora_A.weight", "lora_A_vec")]
            out[key] = _expand(value, run.m, run.rotate, run.shift_a, cut, vec).t()
        elif "lora_B.weight" in key:
            cut = 4096 if any(name in key for name in CUT_4096_B) else 11008
            vec = state[key.replace("lora_B.weight", "lora_B_vec")]
            out[key] = _expand(value.t(), run.n, run.rotate, run.shift_b, cut, vec)
    return out


def write_checkpoint(folder: Path, state: dict[str, torch.Tensor], run: RefRun, safetensors: bool = True) -> Path:
    """A ``checkpoint-N/`` folder: the Trainer's PEFT save of the training layout."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(peft_config(run), indent=2, sort_keys=True))
    if safetensors:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
    else:
        torch.save(state, folder / "adapter_model.bin")
    (folder / "trainer_state.json").write_text("{}")
    return folder


def write_final(folder: Path, state: dict[str, torch.Tensor], run: RefRun, safetensors: bool = True) -> Path:
    """The final output folder: the Trainer save, then ``save_chunk_lora`` overwriting adapter_model.bin."""
    write_checkpoint(folder, state, run, safetensors=safetensors)
    (folder / "trainer_state.json").unlink()
    expanded = expanded_state(state, run)  # raises ReferenceCrash where the reference crashes
    (folder / "completed").touch()
    torch.save(expanded, folder / "adapter_model.bin")
    return folder


# --------------------------------------------------------------------------- its forward, in float64
def full_factors64(state: dict[str, torch.Tensor], path: str, d_in: int, d_out: int, run: RefRun):
    """A (r × d_in) and B (d_out × r) element by element from SPEC §1: row i of A's chunk j is
    A₀[(i + j·s_A) mod r_s], column i of B's chunk j is B₀[:, (i + j·s_B) mod r_s], unshared last."""
    a0 = state[f"{PREFIX}{path}.lora_A.weight"].double()
    b0 = state[f"{PREFIX}{path}.lora_B.weight"].double()
    a_vec = state[f"{PREFIX}{path}.lora_A_vec"].double()
    b_vec = state[f"{PREFIX}{path}.lora_B_vec"].double()
    rs, c_a, c_b = run.shared_r, math.ceil(d_in / run.m), math.ceil(d_out / run.n)
    s_a, s_b = (run.shift_a, run.shift_b) if run.rotate else (0, 0)
    a = torch.zeros(run.r, d_in, dtype=torch.float64)
    b = torch.zeros(d_out, run.r, dtype=torch.float64)
    for k in range(d_in):
        j, t = divmod(k, c_a)
        for i in range(rs):
            a[i, k] = a0[(i + j * s_a) % rs, t]
        a[rs:, k] = a_vec[:, k]
    for k in range(d_out):
        j, t = divmod(k, c_b)
        for i in range(rs):
            b[k, i] = b0[t, (i + j * s_b) % rs]
        b[k, rs:] = b_vec[:, k]
    return a, b


def reference_logits(model_fn, state: dict[str, torch.Tensor], run: RefRun, tokens: torch.Tensor) -> torch.Tensor:
    """The reference's forward, ``base(x) + (α/r)·(x·Aᵀ)·Bᵀ`` on every adapted layer, all in float64
    (dropout off, as in evaluation). ``model_fn`` builds the same base model each call."""
    model = model_fn().double().eval()
    sizes = linear_sizes(model)
    modules = dict(model.named_modules())
    hooks = []
    for path, (d_in, d_out) in sizes.items():
        if f"{PREFIX}{path}.lora_A.weight" not in state:
            continue
        a, b = full_factors64(state, path, d_in, d_out, run)

        def hook(_module, inputs, output, a=a, b=b):
            return output + (run.alpha / run.r) * ((inputs[0] @ a.t()) @ b.t())

        hooks.append(modules[path].register_forward_hook(hook))
    with torch.no_grad():
        out = model(input_ids=tokens).logits
    for h in hooks:
        h.remove()
    return out
