"""PRoLoRA vs PEFT LoRA at equal and at twice the trainable-parameter budget: a study that can tell.

The task is the word cipher of ``make_capacity_task.py`` (a table the base model cannot
know; held-out lines are new lines of the same table), on which an adapter's capacity
decides how much of the table it learns. Every run shares one training loop (the batch
order, dropout seeding, learning-rate schedule and gradient clipping of
``prolora_export.train``), so for a given seed only the adapter differs. LoRA ranks come
from the PRoLoRA adapter's trainable-parameter count: the smallest rank with at least the
same budget (1×) and the smallest with at least twice it (2×). α = 2·rank everywhere
(γ = 2), dropout 0.05, PEFT's default initialisation for LoRA and the project's rectified
initialisation for PRoLoRA.

The base is the demo model (SmolLM2-135M) cut to its first and last block, with its output
layer cut to the code words (``--layers``, ``--head``): on a 2-core machine shared by many
jobs the whole model would allow a handful of runs, not a study (RESULTS.md says more).

Stages for each target set (q/v first, then all seven projections; ``--stage all``):

- ``sweep``: PRoLoRA, LoRA 1× and LoRA 2× at each ``--lrs`` value on seed 0, scored on
  the validation split (this is also the capacity check: LoRA 2× must clearly beat 1×);
- ``seeds``: each method at its best learning rate, on the other seeds;
- ``ablations`` (q/v): rotation off, u = 0 (r = 9: the same budget) and rectified
  initialisation off, at PRoLoRA's learning rate, every seed.

Each finished run is appended to ``--results`` at once and runs already there are skipped,
so an interrupted study resumes where it stopped; several workers may share one results
file (each run is claimed first). ``--report`` only reads the results and writes
``examples/RESULTS.md`` and the plot.

    python examples/make_capacity_task.py
    OMP_NUM_THREADS=1 python examples/compare_lora.py &      # two workers at once
    OMP_NUM_THREADS=1 python examples/compare_lora.py &
    python examples/compare_lora.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from prolora_export.config import PRoLoRAConfig
from prolora_export.data import IGNORE_INDEX, Example, collate, load_dataset
from prolora_export.inject import inject_adapter, prolora_layers
from prolora_export.train import MAX_GRAD_NORM, lr_at, micro_batch

HERE = Path(__file__).parent
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_SETS = {"all7": ALL7, "qv": ["q_proj", "v_proj"]}
DROPOUT = 0.05
PRO_R, PRO_U, PRO_M, PRO_N = 8, 1, 2, 2
#: the plateau check evaluates this many validation examples at ½ and ¾ of training
MIDWAY_EVAL = 100
PROGRESS_EVERY = 50


@dataclass(frozen=True)
class Spec:
    """One training run. ``method`` is ``prolora`` or ``lora``; ``budget`` names the LoRA rank rule."""

    method: str
    targets: str
    lr: float
    seed: int
    stage: str
    budget: str = ""  # "1x" / "2x" for LoRA
    r: int = PRO_R
    u: int = PRO_U
    rotate: bool = True
    rectified: bool = True

    @property
    def label(self) -> str:
        if self.method == "lora":
            return f"LoRA {self.budget}"
        if (self.r, self.u, self.rotate, self.rectified) == (PRO_R, PRO_U, True, True):
            return "PRoLoRA"
        parts = [f"r={self.r}, u={self.u}"] + ([] if self.rotate else ["no rotation"])
        return "PRoLoRA (" + ", ".join(parts + ([] if self.rectified else ["no rectified init"])) + ")"

    @property
    def key(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "stage"}, sort_keys=True)


@dataclass
class Task:
    """What every run shares: a fresh-base-model factory, the splits, and the training budget."""

    base: Callable[[], torch.nn.Module]
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    pad_id: int
    steps: int
    batch: int
    eval_batch: int = 50
    ranks: dict[str, dict[str, int]] = field(default_factory=dict)  # targets -> {"1x": r, "2x": r}


def truncated_base(base: str, layers: int = 0, head_ids: Sequence[int] | None = None) -> Callable[[], torch.nn.Module]:
    """A factory for the base model, cut to its first and last ``layers / 2`` blocks when
    ``layers`` is given (the last blocks are the ones whose output the LM head reads: the first
    blocks alone give a loss of 24 nats on the task before training, first + last 11, all 30
    blocks 9), and with its output layer cut to the rows of ``head_ids`` when given (the tokens a
    completion can hold: the softmax is over the code words and EOS, a hundredth of the cost)."""
    from prolora_export.models import load_base_model

    def make() -> torch.nn.Module:
        model = load_base_model(base)
        if layers:
            blocks = list(model.model.layers)
            kept = blocks[: (layers + 1) // 2] + blocks[len(blocks) - layers // 2 :]
            for index, block in enumerate(kept):
                block.self_attn.layer_idx = index  # the KV-cache slot
            model.model.layers = torch.nn.ModuleList(kept)
            model.config.num_hidden_layers = layers
            model.config.use_cache = False
        if head_ids is not None:
            rows = model.get_output_embeddings().weight.detach()[torch.tensor(list(head_ids))].clone()
            head = torch.nn.Linear(rows.shape[1], rows.shape[0], bias=False)
            head.weight = torch.nn.Parameter(rows, requires_grad=False)
            model.lm_head = head  # untied: the input embedding keeps the whole vocabulary
            model.config.tie_word_embeddings = False
        return model

    return make


def code_labels(examples: list[Example], marker: int) -> list[Example]:
    """Keep the labels of the tokens right after ``marker`` (the code words after each ``=``) only."""
    def keep(ids: list[int], labels: list[int]) -> list[int]:
        return [t if i and ids[i - 1] == marker else IGNORE_INDEX for i, t in enumerate(labels)]

    return [Example(e.input_ids, keep(e.input_ids, e.labels)) for e in examples]


def relabel(examples: list[Example], head_ids: Sequence[int]) -> list[Example]:
    """Labels as row numbers of the cut output layer (see :func:`truncated_base`)."""
    row = {token: i for i, token in enumerate(head_ids)}
    return [Example(e.input_ids, [row[t] if t != IGNORE_INDEX else t for t in e.labels]) for e in examples]


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def prolora_model(base: torch.nn.Module, spec: Spec) -> torch.nn.Module:
    config = PRoLoRAConfig(r=spec.r, unshared_r=spec.u, sharing_rate_a=PRO_M, sharing_rate_b=PRO_N,
                           rotate=spec.rotate, lora_alpha=2 * spec.r, lora_dropout=DROPOUT,
                           target_modules=TARGET_SETS[spec.targets])  # fmt: skip
    model = inject_adapter(base, config)
    if not spec.rectified:
        # the ablation: the shard's fan-in taken as its chunk width c_A, not d_in (bound √m larger)
        with torch.no_grad():
            for _, layer in prolora_layers(model):
                shard = layer.adapter_tensors().get("prolora_A_shard")
                if shard is not None:
                    shard.uniform_(-1 / math.sqrt(shard.shape[1]), 1 / math.sqrt(shard.shape[1]))
    return model


def lora_model(base: torch.nn.Module, targets: str, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=DROPOUT, target_modules=TARGET_SETS[targets])
    return get_peft_model(base, config)


def lora_ranks(task: Task, targets: str) -> dict[str, int]:
    """The smallest LoRA ranks with at least 1× and 2× PRoLoRA's trainable parameters."""
    if targets not in task.ranks:
        budget = trainable(prolora_model(task.base(), Spec("prolora", targets, 0.0, 0, "")))
        per_rank = trainable(lora_model(task.base(), targets, 1))
        task.ranks[targets] = {"1x": math.ceil(budget / per_rank), "2x": math.ceil(2 * budget / per_rank)}
    return task.ranks[targets]


def build(task: Task, spec: Spec) -> torch.nn.Module:
    torch.manual_seed(spec.seed)  # the adapter's initial values
    if spec.method == "prolora":
        return prolora_model(task.base(), spec)
    return lora_model(task.base(), spec.targets, lora_ranks(task, spec.targets)[spec.budget])


def completion_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(mean loss per labelled token, per-row exact match of greedy tokens, greedy-correct tokens,
    labelled tokens).

    The vocabulary projection is only computed from the first labelled position on
    (``logits_to_keep``): the prompt's logits would be thrown away, and on a model cut to a
    few blocks they are most of the cost. The value is the model's own ``labels=`` loss.
    """
    labels = batch["labels"]
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
    first = int(labelled[0]) + 1
    keep = labels.shape[1] - first + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    logits, targets = logits[:, :-1].float(), labels[:, first:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    mask = targets != IGNORE_INDEX
    hits = logits.argmax(-1) == targets
    return loss, (hits | ~mask).all(dim=1), int((hits & mask).sum()), int(mask.sum())


def fit(model, task: Task, lr: float, seed: int, on_step: Callable[[int], None] | None = None) -> list[float]:
    """The training step of ``prolora_export.train`` on one process; returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(task.steps):
        torch.manual_seed(seed * 1_000_003 + step * 1009)  # dropout RNG, as in train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, task.steps, lr)
        loss, *_ = completion_loss(model, collate(micro_batch(task.train, step, task.batch, 1, 0, seed), task.pad_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            break  # diverged: the record says so, the sweep drops this learning rate
        losses.append(round(value, 5))
        if (step + 1) % PROGRESS_EVERY == 0:
            recent = statistics.fmean(losses[-PROGRESS_EVERY:])
            print(f"      step {step + 1}/{task.steps}  loss {recent:.4f}", flush=True)
        if on_step:
            on_step(step + 1)
    return losses


def evaluate(model, task: Task, examples: Sequence[Example]) -> dict[str, float]:
    """Held-out loss per labelled token, token accuracy (greedy) and exact match (every labelled
    token of the line greedy-correct)."""
    was_training = model.training
    model.eval()
    total, count, hits, correct = 0.0, 0, 0, 0
    with torch.no_grad():
        for i in range(0, len(examples), task.eval_batch):
            batch = collate(list(examples[i : i + task.eval_batch]), task.pad_id)
            loss, exact, right, n = completion_loss(model, batch)
            total += float(loss) * n
            count += n
            hits += int(exact.sum())
            correct += right
    model.train(was_training)
    return {"loss": round(total / max(count, 1), 5), "exact": round(hits / len(examples), 4),
            "token_acc": round(correct / max(count, 1), 4)}  # fmt: skip


def run(task: Task, spec: Spec) -> dict:
    """Train one spec from scratch; its record, with the valid loss (first MIDWAY_EVAL examples) at ½ and ¾
    of training and the full valid/test loss and exact match at the end."""
    model = build(task, spec)
    checkpoints = {task.steps // 2: "half", (3 * task.steps) // 4: "three_quarters"}
    midway = {}

    def on_step(step: int) -> None:
        if step in checkpoints:
            midway[f"valid_loss_{checkpoints[step]}"] = evaluate(model, task, task.valid[:MIDWAY_EVAL])["loss"]

    tic = time.perf_counter()
    losses = fit(model, task, spec.lr, spec.seed, on_step)
    seconds = time.perf_counter() - tic
    diverged = len(losses) < task.steps
    record = {**asdict(spec), "key": spec.key, "label": spec.label, "params": trainable(model),
              "steps": task.steps, "batch": task.batch, "train_losses": losses, "diverged": diverged,
              "train_s": round(seconds, 1)}  # fmt: skip
    if spec.method == "lora":
        record["rank"] = task.ranks[spec.targets][spec.budget]
    if not diverged:
        valid, test = evaluate(model, task, task.valid), evaluate(model, task, task.test)
        midway["valid_loss_end"] = evaluate(model, task, task.valid[:MIDWAY_EVAL])["loss"]
        record.update(midway, midway_eval_examples=MIDWAY_EVAL, valid_loss=valid["loss"], valid_exact=valid["exact"],
                      test_loss=test["loss"], test_exact=test["exact"], valid_token_acc=valid["token_acc"],
                      test_token_acc=test["token_acc"])  # fmt: skip
    return record


# ---------------------------------------------------------------------------------- plan


def read_results(path: Path, setup: dict | None = None) -> list[dict]:
    """The finished runs; with ``setup``, only those made with that model cut and training budget."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if not setup or all(r.get(k) == v for k, v in setup.items())]


def best_lr(results: list[dict], method: str, targets: str, budget: str, lrs: Sequence[float]) -> float | None:
    """The swept learning rate with the lowest validation loss on seed 0 (None until all are done)."""
    scored = {
        r["lr"]: (r["valid_loss"] if not r["diverged"] else math.inf)
        for r in results
        if r["stage"] == "sweep" and (r["method"], r["targets"], r["budget"], r["seed"]) == (method, targets, budget, 0)
        and (r["r"], r["u"], r["rotate"], r["rectified"]) == (PRO_R, PRO_U, True, True)
    }  # fmt: skip
    if any(lr not in scored for lr in lrs):
        return None
    return min(lrs, key=lambda lr: scored[lr])


METHODS = (("prolora", ""), ("lora", "1x"), ("lora", "2x"))


def plan(stage: str, results: list[dict], lrs: Sequence[float], seeds: Sequence[int]) -> list[Spec]:
    """The specs of one stage (``<targets>_<kind>``) that can be planned from the results so far:
    seeds and ablations need the sweep of their method to be complete."""
    targets, kind = stage.split("_")
    if kind == "sweep":
        return [Spec(m, targets, lr, seeds[0], "sweep", b) for m, b in METHODS for lr in lrs]
    if kind == "seeds":
        out = []
        for m, b in METHODS:
            lr = best_lr(results, m, targets, b, lrs)
            if lr is not None:
                out += [Spec(m, targets, lr, s, "seeds", b) for s in seeds[1:]]
        return out
    if kind == "lrcheck":  # LoRA at every swept lr on every seed: is the seed-0 choice of lr robust?
        return [Spec("lora", targets, lr, s, "lrcheck", b) for _, b in METHODS[1:] for lr in lrs for s in seeds]
    if kind == "ablations":
        lr = best_lr(results, "prolora", targets, "", lrs)
        if lr is None:
            return []
        variants = [dict(rotate=False), dict(r=PRO_R + PRO_U, u=0), dict(rectified=False)]
        return [Spec("prolora", targets, lr, s, "ablations", **v) for v in variants for s in seeds]
    raise ValueError(stage)


#: the order of work: q/v first (there the task discriminates capacity, see RESULTS.md), then all seven
STAGES = {"qv": ["qv_sweep", "qv_seeds", "qv_ablations"], "all7": ["all7_sweep", "all7_seeds"]}
#: ``--stage qv-main``: the q/v comparison without its ablations; ``qv-lrcheck``: LoRA at every
#: swept learning rate on every seed (the sweep picks on seed 0 only)
STAGES_EXTRA = {"qv-main": ["qv_sweep", "qv_seeds"], "qv-lrcheck": ["qv_lrcheck"]}


def claim(folder: Path, spec: Spec) -> bool:
    """Take a run for this process (several workers may share one results file); False if another
    live process has it. A claim left by a dead process is taken over."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / hashlib.sha1(spec.key.encode()).hexdigest()[:16]
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(path.read_text() or 0), 0)
                return False
            except (ProcessLookupError, ValueError, FileNotFoundError):
                path.unlink(missing_ok=True)
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def release(folder: Path, spec: Spec) -> None:
    import hashlib

    (folder / hashlib.sha1(spec.key.encode()).hexdigest()[:16]).unlink(missing_ok=True)


# -------------------------------------------------------------------------------- report

REPORT_END = "<!-- end of the generated part: what follows is kept when the report is rewritten -->"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 3) -> str:
    if any(math.isnan(v) for v in values):
        return "—"  # not recorded by an older version of this script
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def plateau(record: dict) -> tuple[float, float]:
    """Mean training loss over the 9th and over the 10th (last) tenth of training."""
    losses = record["train_losses"]
    tenth = max(1, len(losses) // 10)
    return statistics.fmean(losses[-2 * tenth : -tenth]), statistics.fmean(losses[-tenth:])


def groups(results: list[dict], lrs: Sequence[float]) -> list[dict]:
    """One row per configuration: its runs over seeds (at the method's best swept learning rate)."""
    rows = []
    for targets in TARGET_SETS:
        for method, budget in METHODS:
            lr = best_lr(results, method, targets, budget, lrs)
            wanted = (method, targets, budget, lr)
            runs = [r for r in results if (r["method"], r["targets"], r["budget"], r["lr"]) == wanted
                    and r["stage"] != "ablations" and not r["diverged"]]  # fmt: skip
            if runs:
                rows.append({"targets": targets, "label": runs[0]["label"], "lr": lr, "runs": runs})
    ablations: dict[str, list[dict]] = {}
    for r in results:
        if r["stage"] == "ablations" and not r["diverged"]:
            ablations.setdefault(r["label"], []).append(r)
    rows += [{"targets": runs[0]["targets"], "label": label, "lr": runs[0]["lr"], "runs": runs, "ablation": True}
             for label, runs in ablations.items()]  # fmt: skip
    return rows


def row_md(row: dict, budget: int | None) -> str:
    runs = sorted(row["runs"], key=lambda r: r["seed"])
    params = runs[0]["params"]
    name = row["label"] + (f" (r={runs[0]['rank']})" if "rank" in runs[0] else "")
    tenths = [plateau(r) for r in runs]
    flat = f"{statistics.fmean(t[0] for t in tenths):.3f} → {statistics.fmean(t[1] for t in tenths):.3f}"
    keys = ("valid_loss_half", "valid_loss_three_quarters", "valid_loss_end")
    valid_path = " → ".join(f"{statistics.fmean(r[k] for r in runs):.3f}" for k in keys if all(k in r for r in runs))
    accuracy = [100 * r.get("test_token_acc", math.nan) for r in runs]
    per_seed = ", ".join(f"{r['test_loss']:.3f}" for r in runs)
    ratio = f"{params / budget:.2f}×" if budget else "—"
    return (f"| {name} | {params:,} | {ratio} | {row['lr']:g} | {len(runs)} | "
            f"{fmt([r['test_loss'] for r in runs])} | {per_seed} | {fmt(accuracy, 1)} | "
            f"{fmt([100 * r['test_exact'] for r in runs], 1)} | "
            f"{fmt([r['valid_loss'] for r in runs])} | {valid_path} | {flat} |")  # fmt: skip


def sweep_md(results: list[dict], lrs: Sequence[float]) -> list[str]:
    lines = ["| targets | adapter | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|---|" + "---:|" * len(lrs)]
    for targets in TARGET_SETS:
        for method, budget in METHODS:
            cells = []
            for lr in lrs:
                hit = [r for r in results if r["stage"] == "sweep" and r["seed"] == 0 and r["lr"] == lr
                       and (r["method"], r["targets"], r["budget"]) == (method, targets, budget)]  # fmt: skip
                cells.append("—" if not hit else "diverged" if hit[0]["diverged"] else f"{hit[0]['valid_loss']:.3f}")
            if any(c != "—" for c in cells):
                label = "PRoLoRA" if method == "prolora" else f"LoRA {budget}"
                best = best_lr(results, method, targets, budget, lrs)
                cells = [f"**{c}**" if lr == best else c for lr, c in zip(lrs, cells, strict=True)]
                lines.append(f"| {targets} | {label} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], results: list[dict], lrs: Sequence[float], path: Path, title: str) -> None:
    """Test loss against trainable parameters: PRoLoRA and its ablations at PRoLoRA's learning rate,
    LoRA 1×–2× as one line per swept learning rate; big markers are means, small dots single seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {"all7": "tab:blue", "qv": "tab:orange"}
    styles = ["o-", "s--", "^:"]
    for targets in TARGET_SETS:
        for lr, style in zip(lrs, styles, strict=False):
            series = []
            for budget in ("1x", "2x"):
                wanted = ("lora", targets, budget, lr)
                runs = [r for r in results if (r["method"], r["targets"], r["budget"], r["lr"]) == wanted
                        and not r["diverged"] and r["stage"] != "ablations"]  # fmt: skip
                if runs:
                    series.append((runs[0]["params"], [r["test_loss"] for r in runs], runs[0]["rank"]))
            if not series:
                continue
            xs, means = [x for x, _, _ in series], [statistics.fmean(v) for _, v, _ in series]
            seeds = "/".join(str(len(v)) for _, v, _ in series)
            ax.plot(xs, means, style, color=colors[targets], label=f"LoRA {targets}, lr {lr:g} ({seeds} seeds)")
            for x, values, rank in series:
                ax.plot([x] * len(values), values, ".", color=colors[targets], alpha=0.5)
                ax.annotate(f"r={rank}", (x, statistics.fmean(values)), fontsize=7, xytext=(6, 4),
                            textcoords="offset points")  # fmt: skip
    ablation_markers = iter("xPD")
    for r in rows:
        if r["label"] != "PRoLoRA" and not r.get("ablation"):
            continue
        values = [run["test_loss"] for run in r["runs"]]
        x, color = r["runs"][0]["params"], colors[r["targets"]] if not r.get("ablation") else "gray"
        ax.plot([x], [statistics.fmean(values)], next(ablation_markers, "x") if r.get("ablation") else "*",
                color=color, markersize=14 if not r.get("ablation") else 7, fillstyle="none",
                label=f"{r['label']} {r['targets']}, lr {r['lr']:g} ({len(values)} seeds)")  # fmt: skip
        ax.plot([x] * len(values), values, ".", color=color, alpha=0.5)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    thousands = FuncFormatter(lambda x, _: f"{x / 1000:g}k")
    ax.xaxis.set_major_formatter(thousands)
    ax.xaxis.set_minor_formatter(thousands)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(labelsize=8)
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("held-out (test) loss per code word (log)")
    ax.set_title(f"{title}: held-out loss vs adapter size (markers: means; dots: seeds)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class Regime:
    """One task size of the study: its results, swept learning rates and plot file."""

    title: str
    results: list[dict]
    lrs: Sequence[float]
    png: Path
    command: str


def regime_md(regime: Regime, md: Path) -> list[str]:
    """The tables and the plot of one regime."""
    rows = groups(regime.results, regime.lrs)
    if not rows:
        return [f"## {regime.title}", "", "No finished runs yet.", ""]
    regime.png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, regime.results, regime.lrs, regime.png, regime.title)
    header = ("| adapter | trainable params | vs PRoLoRA | lr | seeds | test loss | per seed | test token acc % "
              "| test exact % "
              "| valid loss | valid loss ½ → ¾ → end | train loss, 9th → 10th tenth |")  # fmt: skip
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    first = regime.results[0]
    lines = [f"## {regime.title}", "", f"Command: `{regime.command}`. {first['steps']} steps of batch "
             f"{first['batch']}.", ""]  # fmt: skip
    for targets, title in (("qv", "q_proj and v_proj only"), ("all7", "All seven projections")):
        subset = [r for r in rows if r["targets"] == targets and not r.get("ablation")]
        if not subset:
            continue
        budget = next((r["runs"][0]["params"] for r in subset if r["label"] == "PRoLoRA"), None)
        lines += [f"### {title}", "", header, rule] + [row_md(r, budget) for r in subset] + [""]
    ablations = [r for r in rows if r.get("ablation")]
    if ablations:
        targets = ablations[0]["targets"]
        reference = [r for r in rows if r["targets"] == targets and r["label"] == "PRoLoRA" and not r.get("ablation")]
        budget = ablations[0]["runs"][0]["params"]
        lines += [f"### Ablations ({targets}, PRoLoRA's learning rate, same budget)", "", header, rule]
        lines += [row_md(r, budget) for r in reference + ablations] + [""]
    lines += ["### Learning-rate sweep (seed 0, validation loss; bold = chosen)", "",
              *sweep_md(regime.results, regime.lrs), ""]  # fmt: skip
    by_lr: dict[tuple, list[dict]] = {}
    for r in regime.results:
        if r["stage"] != "ablations" and not r["diverged"] and r["lr"] in regime.lrs:
            by_lr.setdefault((r["targets"], r["label"], r["lr"]), []).append(r)
    if any(len(runs) > 1 and key[1] != "PRoLoRA" for key, runs in by_lr.items()):
        lines += ["### Each learning rate over the seeds run at it (test loss)", "",
                  "| targets | adapter | lr | seeds | test loss | per seed | test token acc % |",
                  "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for (targets, label, lr), runs in sorted(by_lr.items()):
            runs = sorted(runs, key=lambda r: r["seed"])
            per_seed = ", ".join(f"{r['test_loss']:.3f}" for r in runs)
            accuracy = fmt([100 * r.get("test_token_acc", math.nan) for r in runs], 1)
            lines.append(f"| {targets} | {label} | {lr:g} | {len(runs)} | {fmt([r['test_loss'] for r in runs])} "
                         f"| {per_seed} | {accuracy} |")  # fmt: skip
        lines.append("")
    lines += [f"![held-out loss vs trainable parameters, {regime.title}]({regime.png.relative_to(md.parent)})", ""]
    return lines


def write_report(regimes: Sequence[Regime], md: Path) -> None:
    """RESULTS.md (setup, tables, plots, commands); the hand-written reading below REPORT_END is kept."""
    first = next((r.results[0] for r in regimes if r.results), None)
    if first is None:
        raise SystemExit("no finished runs yet")
    lines = [
        "# PRoLoRA vs LoRA: a study that can tell",
        "",
        "**The reading, the pilots and what was cut are at the end of this page.**",
        "",
        "Data: `python examples/make_capacity_task.py` (100 words → `examples/capacity`) and "
        "`python examples/make_capacity_task.py --words 300 --out examples/capacity300` (deterministic, no "
        "downloads). Two workers ran each command below at once (they share the results file and claim runs). "
        "This page and the plots: `python examples/compare_lora.py --report`.",
        "",
        f"Base: {first['base']} cut to its first and last decoder block ({first['layers']} of 30), output "
        "layer cut to the code words (see below why). Every run: AdamW, linear warmup (10%) and decay to 0, "
        "gradient clipping 1.0, dropout 0.05, α = 2·rank; the same data order and dropout seeds for every adapter "
        "of a seed. Loss and token accuracy are per code word (the token after each `=`); exact = all four code "
        "words of a line greedy-correct. Test = 400 held-out lines, valid = 200 (the sweep's score); mean ± std "
        "over seeds. The last two columns are the plateau check: the validation loss (first 100 lines) at ½, ¾ and "
        "the end of training, and the mean training loss over the 9th and the 10th tenth of the steps.",
        "",
    ]
    for regime in regimes:
        lines += regime_md(regime, md)
    kept = md.read_text().split(REPORT_END, 1)[1] if md.is_file() and REPORT_END in md.read_text() else "\n"
    md.write_text("\n".join(lines) + "\n" + REPORT_END + kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=2, help="keep the first and last N/2 decoder blocks (0: all)")
    parser.add_argument("--head", choices=["completion", "full"], default="completion",
                        help="output layer: only the tokens completions hold, or the whole vocabulary")
    parser.add_argument("--data", default=str(HERE / "capacity"), help="folder of make_capacity_task.py")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lrs", default="1e-2,3e-2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--stage", default="all", choices=["all", *STAGES, *STAGES_EXTRA])
    parser.add_argument("--only", default="", help="comma-separated run labels to restrict to (e.g. 'LoRA 1x')")
    parser.add_argument("--results", default=str(HERE / "study" / "results.jsonl"))
    parser.add_argument("--report", action="store_true", help="only write RESULTS.md and the plot")
    args = parser.parse_args()
    results_path = Path(args.results)
    lrs = [float(x) for x in args.lrs.split(",")]
    setup = {"base": args.base, "layers": args.layers, "head": args.head, "steps": args.steps, "batch": args.batch_size}
    if args.report:
        worker = "OMP_NUM_THREADS=1 python examples/compare_lora.py"
        regimes = [
            Regime("100-word cipher", read_results(HERE / "study" / "results.jsonl", setup), lrs,
                   HERE / "study" / "loss_vs_params.png", f"{worker} --stage qv` and `{worker} --stage qv-lrcheck"),
            Regime("300-word cipher (pilots; not converged on q/v)",
                   read_results(HERE / "study" / "k300" / "results.jsonl", setup), [1e-2],
                   HERE / "study" / "k300" / "loss_vs_params.png",
                   f"{worker} --stage qv-main --lrs 1e-2 --data examples/capacity300 "
                   "--results examples/study/k300/results.jsonl"),
        ]  # fmt: skip
        write_report(regimes, HERE / "RESULTS.md")
        return
    from transformers import AutoTokenizer

    from prolora_export.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.base))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = Path(args.data)
    marker = tokenizer(" =", add_special_tokens=False)["input_ids"][-1]
    splits = {
        name: code_labels(load_dataset(data / f"{name}.jsonl", tokenizer, 64), marker)
        for name in ("train", "valid", "test")
    }
    head_ids = None
    if args.head == "completion":
        head_ids = sorted({t for examples in splits.values() for e in examples for t in e.labels if t != IGNORE_INDEX})
        splits = {name: relabel(examples, head_ids) for name, examples in splits.items()}
    task = Task(truncated_base(args.base, args.layers, head_ids), splits["train"], splits["valid"], splits["test"],
                pad_id, args.steps, args.batch_size)  # fmt: skip
    seeds = [int(x) for x in args.seeds.split(",")]
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    stages = [s for name, group in {**STAGES, **STAGES_EXTRA}.items() if args.stage in (name, "all") for s in group]
    stages = list(dict.fromkeys(stages))
    claims = results_path.parent / "claims"
    while True:  # until every plannable run is done; waits while another worker holds a run
        ran = waiting = False
        for stage in stages:
            for spec in plan(stage, read_results(results_path, setup), lrs, seeds):
                done = {r["key"] for r in read_results(results_path, setup)}
                if spec.key in done or (only and spec.label not in only):
                    continue
                if not claim(claims, spec):
                    waiting = True
                    continue
                try:
                    when = time.strftime("%H:%M:%S")
                    print(f"[{when}] {stage}: {spec.label} lr={spec.lr} seed={spec.seed}", flush=True)
                    record = {**run(task, spec), **setup}
                    with results_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                finally:
                    release(claims, spec)
                ran = True
                scores = [f"{k} {record.get(k)}" for k in ("valid_loss", "test_loss", "test_token_acc", "test_exact")]
                print(f"    params {record['params']:,}  {'  '.join(scores)}  {record['train_s']:.0f}s", flush=True)
        if not ran and not waiting:
            break
        if not ran:
            time.sleep(20)
    print("command:", "python examples/compare_lora.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
