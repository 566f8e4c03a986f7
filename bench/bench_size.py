"""Adapter size on disk: PRoLoRA against a PEFT LoRA adapter of the same rank, for several (r, u, m, n).

    python bench/bench_size.py

Both adapters target the seven linear layers of every block of the demo model (SmolLM2-135M)
and are written by their own tools: ``save_adapter`` for PRoLoRA, PEFT's ``save_pretrained``
for LoRA. The byte ratio should equal the parameter ratio up to the file headers. Writes
bench/SIZE.md and bench/size.json. Sizes do not depend on the machine; nothing is timed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import LoraConfig, get_peft_model

from prolora_export.config import PRoLoRAConfig
from prolora_export.formats.prolora import Adapter, save_adapter
from prolora_export.inject import adapter_state_dict, inject_adapter, remove_adapter
from prolora_export.models import ensure_demo_model, load_base_model

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: (r, u, m, n): the paper's usual settings, both extremes of u, and plain LoRA (u = r) as a check
CONFIGS = [
    (8, 1, 2, 2), (8, 0, 2, 2), (8, 2, 2, 2), (8, 1, 4, 4), (16, 2, 2, 2), (16, 2, 4, 4), (32, 4, 4, 4), (8, 8, 2, 2),
]  # fmt: skip


def prolora_size(model, work: Path, r: int, u: int, m: int, n: int) -> tuple[int, int]:
    """(parameters, safetensors bytes) of a PRoLoRA adapter, saved by ``save_adapter``."""
    config = PRoLoRAConfig(r=r, unshared_r=u, sharing_rate_a=m, sharing_rate_b=n, target_modules=TARGETS)
    inject_adapter(model, config)
    adapter = Adapter(config, {k: v.detach().clone() for k, v in adapter_state_dict(model).items()})
    remove_adapter(model)
    out = save_adapter(work / f"prolora-{r}-{u}-{m}-{n}", adapter, force=True)
    return adapter.num_parameters, (out / "adapter_model.safetensors").stat().st_size


def lora_size(model, work: Path, r: int) -> tuple[int, int]:
    """(parameters, safetensors bytes) of PEFT's own LoRA adapter of rank ``r``."""
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    peft_model.save_pretrained(work / f"peft-{r}")
    peft_model.unload()
    return params, (work / f"peft-{r}" / "adapter_model.safetensors").stat().st_size


def main() -> None:
    model = load_base_model(str(ensure_demo_model(quiet=True)))
    rows, lora = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-size-") as tmp:
        work = Path(tmp)
        for r, u, m, n in CONFIGS:
            if r not in lora:
                lora[r] = lora_size(model, work, r)
            params, size = prolora_size(model, work, r, u, m, n)
            rows.append({"r": r, "u": u, "m": m, "n": n, "prolora_parameters": params, "prolora_bytes": size,
                         "lora_parameters": lora[r][0], "lora_bytes": lora[r][1],
                         "parameter_ratio": params / lora[r][0], "byte_ratio": size / lora[r][1]})  # fmt: skip
            print(rows[-1], flush=True)
    command = "python bench/bench_size.py"
    (HERE / "size.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [
        "## Adapter size on disk: PRoLoRA vs PEFT LoRA of the same rank",
        "",
        f"Command: `{command}`. Demo model (SmolLM2-135M), all seven linear layers of its 30 blocks, fp32; "
        "each adapter written by its own tool (`save_adapter`; PEFT `save_pretrained`). u = r is plain LoRA.",
        "",
        "| r | u | m | n | PRoLoRA params | PRoLoRA bytes | LoRA params | LoRA bytes | param ratio | byte ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['r']} | {row['u']} | {row['m']} | {row['n']} | {row['prolora_parameters']:,} "
            f"| {row['prolora_bytes']:,} | {row['lora_parameters']:,} | {row['lora_bytes']:,} "
            f"| {row['parameter_ratio']:.4f} | {row['byte_ratio']:.4f} |"
        )
    (HERE / "SIZE.md").write_text("\n".join(lines) + "\n")
    print((HERE / "SIZE.md").read_text())


if __name__ == "__main__":
    main()
