"""Adapter files: ours (SPEC §2), PEFT LoRA and the reference implementation's layouts (SPEC §3)."""
