"""Fine-tuning a causal LM with a PRoLoRA adapter.

One process or many: the loop runs through :class:`accelerate.Accelerator`, so the same
call works as a plain ``python`` run (CUDA when available, else CPU), under
``accelerate launch`` and under ``torchrun --nproc_per_node N`` (DDP; gloo on CPU).

Output layout (``out`` is the adapter folder, loadable with
:func:`prolora_export.formats.prolora.load_adapter`)::

    out/adapter_config.json, out/adapter_model.safetensors   # SPEC §2
    out/train_log.jsonl                                       # one line per optimizer step
    out/trainer_state/state.json                              # step, hyperparameters
    out/trainer_state/optimizer.safetensors                   # AdamW moments (tensors only)

The whole folder is replaced atomically at every save, so the log, the optimizer state
and the adapter always belong to the same step. Resuming needs nothing else: the data
order and the dropout RNG are functions of ``(seed, step, rank)``, and the learning rate
is a function of ``step``, so a resumed run takes exactly the steps an uninterrupted run
would have taken.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import PRoLoRAConfig, read_json
from .data import IGNORE_INDEX, Example, collate, load_dataset
from .errors import PRoLoRAError
from .formats.prolora import Adapter, load_adapter, read_safetensors, write_adapter_files
from .inject import ALL_LINEAR, adapter_state_dict, inject_adapter, load_adapter_weights, plan_adapter
from .models import DEMO_ALIASES, causal_lm_problem, checked_remote_code, load_base_model, resolve_model
from .outputs import atomic_output_dir, check_destination, check_free_space, output_lock

#: every Linear layer of every block (a Llama block's seven projections, Phi-3's fused qkv_proj
#: and gate_up_proj, OPT's fc1/fc2 …), not the output head: PRoLoRA's rank is cheap, and adapting
#: the MLP too learns noticeably faster than attention only (the paper's instruction-tuning setup).
DEFAULT_TARGETS = ALL_LINEAR
DEFAULT_MAX_LENGTH = 256
#: files of which a model folder needs at least one for transformers to build its tokenizer
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
)  # fmt: skip
LOG_NAME = "train_log.jsonl"
STATE_DIR = "trainer_state"
WARMUP_FRACTION = 0.1
MAX_GRAD_NORM = 1.0
DTYPES = ("auto", "fp32", "bf16", "fp16")


def mixed_precision_for(dtype: str, cuda: bool) -> str:
    """accelerate's ``mixed_precision`` for ``--dtype``; half precision is refused on CPU."""
    if dtype not in DTYPES:
        raise PRoLoRAError(f"unknown dtype '{dtype}' (expected one of {', '.join(DTYPES)})")
    if dtype in ("bf16", "fp16") and not cuda:
        raise PRoLoRAError(f"--dtype {dtype} needs a CUDA GPU; on CPU use fp32 (or auto)")
    if dtype == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[dtype]


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over the first 10% of steps, then linear decay to 0 at ``total``."""
    warmup = max(1, math.ceil(WARMUP_FRACTION * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def micro_batch(examples: Sequence[Example], micro: int, batch: int, world: int, rank: int, seed: int) -> list[Example]:
    """The examples of global micro-batch number ``micro`` for one rank.

    Each epoch is a fresh permutation (seeded by ``seed`` and the epoch), wrapped around
    to fill the last global batch so that every rank always gets ``batch`` examples.
    """
    global_batch = batch * world
    per_epoch = math.ceil(len(examples) / global_batch)
    epoch, index = divmod(micro, per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    start = index * global_batch + rank * batch
    return [examples[order[(start + k) % len(order)]] for k in range(batch)]


def _optimizer_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        f"{index}.{key}": value.detach().cpu().contiguous()
        for index, slots in state["state"].items()
        for key, value in slots.items()
    }


def _optimizer_state(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    return state


def _truncation_note(data: str | Path, counts: dict[str, int], max_length: int) -> str | None:
    """What --max-length did to the data, which would otherwise change silently."""
    if not counts.get("cut"):
        return None
    dropped = counts["dropped"]
    gone = f"; {dropped} of them are left out (their labelled part starts beyond it)" if dropped else ""
    return (
        f"note: {counts['cut']} of the {counts['examples']} examples of {data} are longer than --max-length "
        f"{max_length} tokens and were cut{gone}"
    )


#: adapter hyperparameters an exact resume needs unchanged
RESUME_HYPERPARAMETERS = (
    "r", "unshared_r", "sharing_rate_a", "sharing_rate_b", "rotate", "stride_a", "stride_b", "lora_alpha",
    "lora_dropout", "target_modules", "modules",
)  # fmt: skip


def _read_resume_state(out: Path) -> dict[str, Any] | None:
    """The saved trainer state of ``out`` (None when there is no ``out`` yet: nothing to resume)."""
    state_file = out / STATE_DIR / "state.json"
    if not out.exists():
        return None
    if not state_file.is_file():
        raise PRoLoRAError("cannot resume: no trainer_state/state.json (not a training output?)", str(out))
    state = read_json(state_file)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise PRoLoRAError('expected a JSON object with an integer "step"', str(state_file))
    return state


def _same_base(saved: str | None, now: str) -> bool:
    """Whether two ``--base`` values name the same model (a folder by its resolved path, the demo alias as the demo)."""

    def identity(name: str | None) -> str | None:
        if name is None:
            return None
        if name.lower() in DEMO_ALIASES:
            return "demo"
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else name

    return identity(saved) == identity(now)


def _resume_differences(out: Path, config: PRoLoRAConfig, state: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """Every setting that differs from the saved run: each one makes the resumed run another run."""
    saved = load_adapter(out).config
    diffs = [
        f"{k}: saved {getattr(saved, k)!r}, now {getattr(config, k)!r}"
        for k in RESUME_HYPERPARAMETERS
        if getattr(saved, k) != getattr(config, k)
    ]
    if not _same_base(saved.base_model_name_or_path, config.base_model_name_or_path):
        diffs.append(f"base: saved {saved.base_model_name_or_path!r}, now {config.base_model_name_or_path!r}")
    # saves of older versions lack some settings: those cannot be compared
    diffs += [f"{k}: saved {state[k]!r}, now {v!r}" for k, v in settings.items() if k in state and state[k] != v]
    return diffs


def _check_moments(moments: dict[str, torch.Tensor], trainable: list[torch.nn.Parameter], where: Path) -> None:
    """The saved AdamW moments must be exactly those of these parameters (else Adam would crash or mix layers)."""
    expected = {}
    for index, param in enumerate(trainable):
        expected.update({f"{index}.exp_avg": tuple(param.shape), f"{index}.exp_avg_sq": tuple(param.shape)})
        expected[f"{index}.step"] = ()
    if {k: tuple(v.shape) for k, v in moments.items()} != expected:
        raise PRoLoRAError(
            "the saved optimizer state does not fit this adapter's parameters (a damaged save?); "
            "start over with --force",
            str(where),
        )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _causal_lm_config(source: str, base: str):
    """The base model's config, refused unless it is a decoder-only causal LM (before any weight is read)."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=checked_remote_code(source))
    except (OSError, ValueError, KeyError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PRoLoRAError(f"cannot read the model config: {first_line}", base) from None
    problem = causal_lm_problem(model_config)
    if problem:
        raise PRoLoRAError(f"{problem}; train fine-tunes decoder-only causal language models", base)
    return model_config


def position_limit(model_config) -> tuple[int, str] | None:
    """(positions, config key) the model can attend over, when its config says."""
    values = model_config.to_dict()
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length", "max_sequence_length"):
        if isinstance(values.get(key), int) and values[key] > 0:
            return values[key], key
    return None


def _checked_max_length(max_length: int | None, model_config, base: str) -> int:
    """``--max-length``, by default 256 or the model's position limit when that is smaller; beyond the limit
    is refused (learned position embeddings, as GPT-2's and OPT's, have no row for later tokens)."""
    limit = position_limit(model_config)
    if max_length is None:
        return min(DEFAULT_MAX_LENGTH, limit[0]) if limit else DEFAULT_MAX_LENGTH
    if limit and max_length > limit[0]:
        raise PRoLoRAError(
            f"--max-length {max_length} is more than the {limit[0]} positions of the model (config.json "
            f"{limit[1]}); pass --max-length {limit[0]} or less",
            base,
        )
    return max_length


def _load_tokenizer(source: str, base: str):
    """The base model's tokenizer, which training needs (texts to tokens, the chat template, eos)."""
    from transformers import AutoTokenizer

    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise PRoLoRAError(
            f"training needs the model's tokenizer, and this folder has none ({', '.join(TOKENIZER_FILES)}): "
            "copy the tokenizer files of the model it came from into it",
            base,
        )
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=checked_remote_code(source))
    except PRoLoRAError:
        raise
    except Exception as err:  # transformers' tokenizer loading fails in many ways on a broken folder
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise PRoLoRAError(f"cannot load the tokenizer ({type(err).__name__}: {first_line})", base) from None


def model_eos_ids(source: str, model_config) -> tuple[list[int], str]:
    """The token ids generation stops at (generation_config.json, else config.json) and where they come from."""
    from transformers import GenerationConfig

    try:
        ids, origin = GenerationConfig.from_pretrained(source).eos_token_id, "generation_config.json"
    except (OSError, ValueError):
        ids, origin = None, "config.json"
    if ids is None:
        ids, origin = getattr(model_config, "eos_token_id", None), "config.json"
    return ([ids] if isinstance(ids, int) else [i for i in ids or [] if isinstance(i, int)]), origin


def align_eos(tokenizer, source: str, model_config) -> str | None:
    """Make the eos that training appends the token the model's generation stops at; return a note if changed.

    A tokenizer whose eos differs from the model's (SmolLM2's GGUF conversion said ``<|im_start|>``
    while the model stops at ``<|im_end|>``) would teach every completion to end with a token
    generation does not stop at. The tokenizer (in memory) takes the model's first eos instead.
    """
    ids, origin = model_eos_ids(source, model_config)
    if not ids or tokenizer.eos_token_id in ids:
        return None
    token = tokenizer.convert_ids_to_tokens(ids[0]) if 0 <= ids[0] < len(tokenizer) else None
    if not isinstance(token, str):
        raise PRoLoRAError(f"the model's eos_token_id {ids[0]} ({origin}) is not a token of its tokenizer", source)
    had = f"{tokenizer.eos_token!r} (id {tokenizer.eos_token_id})" if tokenizer.eos_token is not None else "none"
    tokenizer.eos_token = token
    return (
        f"note: the tokenizer's eos token is {had}, but the model stops generating at {token!r} (id {ids[0]}, "
        f"{origin}); training ends completions and texts with {token!r}"
    )


def evaluate_loss(model, examples: Sequence[Example], batch: int, pad_id: int, device) -> float:
    """Mean loss per labelled token over a whole dataset (dropout off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            inputs = {k: v.to(device) for k, v in collate(list(examples[i : i + batch]), pad_id).items()}
            n = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**inputs).loss) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def train(
    base: str,
    data: str | Path,
    out: str | Path,
    *,
    r: int = 8,
    unshared_r: int = 1,
    sharing_rate_a: int = 2,
    sharing_rate_b: int = 2,
    rotate: bool = True,
    stride_a: int | None = None,
    stride_b: int | None = None,
    alpha: float = 16.0,
    dropout: float = 0.05,
    target_modules: Sequence[str] | str = DEFAULT_TARGETS,
    lr: float = 2e-4,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 4,
    grad_accum: int = 1,
    max_length: int | None = None,
    seed: int = 0,
    dtype: str = "auto",
    gradient_checkpointing: bool = False,
    save_every: int | None = None,
    resume: bool = False,
    eval_data: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Train a PRoLoRA adapter on ``data`` (JSONL, see :mod:`prolora_export.data`); return ``out``.

    ``max_steps`` (optimizer steps) overrides ``epochs``. ``batch_size`` is per process;
    the effective batch is ``batch_size × grad_accum × processes``, and it is that batch: each step's
    loss is the mean over all its target tokens, however they fall into micro-batches. ``max_length`` None is
    256 tokens, or the model's position limit when smaller. ``target_modules`` ``all-linear``
    adapts every Linear/Conv1D layer but the output head. ``out`` must not exist unless
    ``force`` (start over) or ``resume`` (continue from its last save, with every setting as
    saved: anything else would not be the same run). The output folder is locked for the
    whole run, so a second run to the same ``out`` fails at once instead of replacing it.
    """
    from accelerate import Accelerator

    out = Path(out).absolute()
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("grad_accum", grad_accum, 1),
        ("max_length", 2 if max_length is None else max_length, 2),
        ("epochs", epochs, 1),
    ):
        if value < low:
            raise PRoLoRAError(f"{name} must be ≥ {low}, got {value}")
    if max_steps is not None and max_steps < 1:
        raise PRoLoRAError(f"max_steps must be ≥ 1, got {max_steps}")
    if save_every is not None and save_every < 1:
        raise PRoLoRAError(f"save_every must be ≥ 1, got {save_every}")
    if not (lr > 0 and math.isfinite(lr)):
        raise PRoLoRAError(f"lr must be a positive number, got {lr}")
    if resume and force:
        raise PRoLoRAError("--resume continues the run in --out and --force starts it over: pass one of them")
    config = PRoLoRAConfig(
        r=r,
        unshared_r=unshared_r,
        sharing_rate_a=sharing_rate_a,
        sharing_rate_b=sharing_rate_b,
        rotate=rotate,
        stride_a=stride_a,
        stride_b=stride_b,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        base_model_name_or_path=base,
    ).validate("options")
    # --out may not replace what training reads; with --resume it is an input itself, so it may exist
    check_destination(out, force or resume, inputs={"base model": base, "training data": data, "eval data": eval_data})
    mixed = mixed_precision_for(dtype, torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    with ExitStack() as held:
        if accelerator.is_main_process:  # the one writer of --out holds its lock from here to the last save
            held.enter_context(output_lock(out))
            check_destination(out, force or resume)  # another run may have written it meanwhile
        return _train_locked(
            accelerator, base, data, out, config, mixed=mixed, lr=lr, epochs=epochs, max_steps=max_steps,
            batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, seed=seed,
            gradient_checkpointing=gradient_checkpointing, save_every=save_every, resume=resume,
            eval_data=eval_data, progress=progress,
        )  # fmt: skip


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant: transformers 5 names it
    ``activation_checkpointing_enable`` (the old name warns and goes in v6), 4.x ``gradient_checkpointing_enable``."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _train_locked(
    accelerator,
    base: str,
    data: str | Path,
    out: Path,
    config: PRoLoRAConfig,
    *,
    mixed: str,
    lr: float,
    epochs: int,
    max_steps: int | None,
    batch_size: int,
    grad_accum: int,
    max_length: int | None,
    seed: int,
    gradient_checkpointing: bool,
    save_every: int | None,
    resume: bool,
    eval_data: str | Path | None,
    progress: bool,
) -> Path:
    """:func:`train` once its options are checked and ``out`` is locked."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    resumed = _read_resume_state(out) if resume else None

    # Everything the user can get wrong is checked before the model's weights are loaded.
    source = resolve_model(base)
    model_config = _causal_lm_config(source, base)
    max_length = _checked_max_length(max_length, model_config, base)
    with torch.device("meta"):  # the layers and their sizes, without reading a weight
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=checked_remote_code(source))
    plan_adapter(skeleton, config)
    if gradient_checkpointing and not skeleton.supports_gradient_checkpointing:
        raise PRoLoRAError(f"{type(skeleton).__name__} does not support --gradient-checkpointing", base)
    del skeleton
    tokenizer = _load_tokenizer(source, base)
    eos_note = align_eos(tokenizer, source, model_config)
    counts: dict[str, int] = {}
    examples = load_dataset(data, tokenizer, max_length, counts)
    eval_examples = load_dataset(eval_data, tokenizer, max_length) if eval_data is not None else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_epoch = math.ceil(len(examples) / (batch_size * world))
    total_steps = max_steps or max(1, epochs * micro_per_epoch // grad_accum)
    settings = {
        "total_steps": total_steps,
        "max_steps": max_steps,
        "epochs": epochs,
        "seed": seed,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "world_size": world,
        "lr": lr,
        "max_length": max_length,
        "mixed_precision": mixed,
        "data_sha256": file_sha256(data),
    }
    if resumed is not None:
        diffs = _resume_differences(out, config, resumed, settings)
        if diffs:
            raise PRoLoRAError(
                f"cannot resume with different hyperparameters or settings ({'; '.join(diffs)}): an exact resume "
                "needs the saved ones (or start over with --force)",
                str(out),
            )

    torch.manual_seed(seed)  # the adapter's initial values: identical on every rank
    model = load_base_model(base, task="causal-lm")
    inject_adapter(model, config)  # config.modules was planned above: exactly those layers
    if gradient_checkpointing:
        model.config.use_cache = False
        enable_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # a save holds the adapter and AdamW's two moments, in fp32, and the previous save until the rename
    check_free_space(out, 2 * 3 * 4 * sum(p.numel() for p in trainable) + (16 << 20))
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    step, log = 0, []
    if resumed is not None:
        load_adapter_weights(model, load_adapter(out).tensors)
        moments_file = out / STATE_DIR / "optimizer.safetensors"
        moments = read_safetensors(moments_file)
        _check_moments(moments, trainable, moments_file)
        optimizer.load_state_dict(
            {"state": _optimizer_state(moments), "param_groups": optimizer.state_dict()["param_groups"]}
        )
        step = resumed["step"]
        try:
            log = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as err:
            raise PRoLoRAError(f"cannot read the training log ({err})", str(out / LOG_NAME)) from None
    if accelerator.is_main_process:  # notes are said once every check has passed, when training starts
        for note in (eos_note, _truncation_note(data, counts, max_length)):
            if note:
                print(note, file=sys.stderr)
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    def save() -> None:
        if eval_examples is not None:
            eval_loss = evaluate_loss(unwrapped, eval_examples, batch_size, pad_id, accelerator.device)
            if log and log[-1]["step"] == step:
                log[-1]["eval_loss"] = eval_loss
        if accelerator.is_main_process:
            state = {"step": step, **settings}
            adapter = Adapter(config, {k: v.float() for k, v in adapter_state_dict(unwrapped).items()})
            with atomic_output_dir(out, force=True, locked=True) as tmp:
                write_adapter_files(tmp, adapter)
                (tmp / STATE_DIR).mkdir()
                (tmp / STATE_DIR / "state.json").write_text(json.dumps(state, indent=2) + "\n")
                moments = _optimizer_tensors(optimizer.optimizer.state_dict())
                save_file(moments, str(tmp / STATE_DIR / "optimizer.safetensors"))
                (tmp / LOG_NAME).write_text("".join(json.dumps(entry) + "\n" for entry in log))
        accelerator.wait_for_everyone()

    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not (progress and accelerator.is_local_main_process),
        desc="training",
        unit="step",
        dynamic_ncols=True,
    )
    start_time = time.perf_counter() - (log[-1]["elapsed_s"] if log else 0.0)
    while step < total_steps:
        tic = time.perf_counter()
        torch.manual_seed(seed * 1_000_003 + step * 1009 + rank)  # dropout RNG: a function of (seed, step, rank)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, lr)
        batches = [
            {key: value.to(accelerator.device) for key, value in collate(micro_batch(
                examples, step * grad_accum + k, batch_size, world, rank, seed), pad_id).items()}
            for k in range(grad_accum)
        ]  # fmt: skip
        targets = [int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batches]  # ≥ 1 each (data.py)
        step_targets = int(accelerator.reduce(torch.tensor(sum(targets), device=accelerator.device), reduction="sum"))
        loss_sum = torch.zeros((), device=accelerator.device)
        for k, batch in enumerate(batches):
            with accelerator.no_sync(model) if k < grad_accum - 1 else nullcontext():
                with accelerator.autocast():
                    loss = model(**batch).loss
                # the model's loss is the mean over this micro-batch's targets; the step's loss is the mean
                # over all its targets, on every rank (DDP averages the gradients over the ranks, hence × world)
                accelerator.backward(loss * (targets[k] * world / step_targets))
            loss_sum += loss.detach().float() * targets[k]
        accelerator.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = float(accelerator.reduce(loss_sum, reduction="sum")) / step_targets
        tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
        tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), reduction="sum"))
        if not math.isfinite(step_loss):
            raise PRoLoRAError(f"the loss became {step_loss} at step {step + 1} (try a lower --lr)")
        step += 1
        seconds = time.perf_counter() - tic
        log.append(
            {
                "step": step,
                "loss": round(step_loss, 6),
                "lr": lr_at(step - 1, total_steps, lr),
                "tokens_per_s": round(tokens / seconds, 1),
                "elapsed_s": round(time.perf_counter() - start_time, 3),
            }
        )
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / seconds:.0f}")
        bar.update(1)
        if step == total_steps or (save_every and step % save_every == 0):
            save()
    bar.close()
    return out


def read_summary(out: str | Path) -> dict[str, Any]:
    """What a finished run did, from its folder: steps, losses, eval loss, time, trainable params."""
    out = Path(out)
    log = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines() if line.strip()]
    adapter = load_adapter(out)
    eval_losses = [e["eval_loss"] for e in log if "eval_loss" in e]
    return {
        "adapter": str(out),
        "steps": log[-1]["step"] if log else 0,
        "first_loss": log[0]["loss"] if log else None,
        "last_loss": log[-1]["loss"] if log else None,
        "min_loss": min(e["loss"] for e in log) if log else None,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "seconds": log[-1]["elapsed_s"] if log else 0.0,
        "trainable_params": adapter.num_parameters,
    }
