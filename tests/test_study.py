"""The PRoLoRA-vs-LoRA study (examples/compare_lora.py) on a tiny random Llama: two steps per
run, so the study's code cannot silently break between the times someone runs it for hours."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from prolora_export.data import IGNORE_INDEX, Example, collate
from tests.conftest import tiny_llama

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


study = load_example("compare_lora")


def cipher_examples(count: int, seed: int, prompt_len: int = 5, code_len: int = 4) -> list[Example]:
    """Token-level stand-ins for the cipher lines: a prompt, then a labelled code and EOS (id 1)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        prompt = [0] + [rng.randrange(2, 64) for _ in range(prompt_len - 1)]
        code = [64 + (t % 60) for t in prompt[1:code_len + 1]] + [1]  # fmt: skip
        out.append(Example(prompt + code, [IGNORE_INDEX] * len(prompt) + code))
    return out


@pytest.fixture
def task():
    return study.Task(lambda: tiny_llama(0), cipher_examples(12, 0), cipher_examples(6, 1), cipher_examples(6, 2),
                      pad_id=1, steps=2, batch=2, eval_batch=4)  # fmt: skip


def test_completion_loss_is_the_models_own_loss(task):
    """Computing the vocabulary projection only from the first labelled position changes nothing."""
    model = tiny_llama(0)
    examples = task.train[:3]
    examples[1] = Example(examples[1].input_ids[:-2], examples[1].labels[:-2])  # ragged: right padding
    batch = collate(examples, pad_id=1)
    loss, exact, correct, count = study.completion_loss(model, batch)
    with torch.no_grad():
        reference = model(**batch)
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, reference.loss, rtol=1e-6, atol=1e-6)
    greedy = reference.logits[:, :-1].argmax(-1)
    labels = batch["labels"][:, 1:]
    assert exact.tolist() == [bool(((greedy == labels) | (labels == IGNORE_INDEX))[i].all()) for i in range(3)]
    assert correct == int(((greedy == labels) & (labels != IGNORE_INDEX)).sum())


def test_budgets_and_two_step_runs(task):
    runs = {}
    for spec in (
        study.Spec("prolora", "all7", 1e-3, 0, "sweep"),
        study.Spec("lora", "all7", 1e-3, 0, "sweep", "1x"),
        study.Spec("lora", "all7", 1e-3, 0, "sweep", "2x"),
        study.Spec("prolora", "all7", 1e-3, 0, "ablations", rotate=False),
        study.Spec("prolora", "all7", 1e-3, 0, "ablations", r=9, u=0),
        study.Spec("prolora", "all7", 1e-3, 0, "ablations", rectified=False),
        study.Spec("prolora", "qv", 1e-3, 0, "sweep"),
    ):
        runs[spec.label, spec.targets] = record = study.run(task, spec)
        assert len(record["train_losses"]) == 2 and not record["diverged"]
        assert all(math.isfinite(record[k]) for k in ("valid_loss", "test_loss", "valid_loss_end"))
        assert 0 <= record["test_exact"] <= 1
    budget = runs["PRoLoRA", "all7"]["params"]
    one, two = runs["LoRA 1x", "all7"], runs["LoRA 2x", "all7"]
    per_rank = one["params"] / one["rank"]
    assert budget <= one["params"] < budget + per_rank  # the smallest rank with at least the budget
    assert 2 * budget <= two["params"] < 2 * budget + per_rank
    assert runs["PRoLoRA (r=9, u=0)", "all7"]["params"] == budget  # u = 0 at the same budget (m = n = 2)
    assert runs["PRoLoRA (r=8, u=1, no rotation)", "all7"]["params"] == budget
    assert runs["PRoLoRA", "qv"]["params"] < budget


def test_same_seed_same_run_and_rectified_ablation(task):
    """Same spec, same losses (data order, dropout and init are seeded); the init ablation widens A₀ only."""
    spec = study.Spec("prolora", "all7", 1e-3, 3, "sweep")
    assert study.run(task, spec)["train_losses"] == study.run(task, spec)["train_losses"]
    plain = study.build(task, spec)
    wide = study.build(task, study.Spec("prolora", "all7", 1e-3, 3, "ablations", rectified=False))
    for (name, a), (_, b) in zip(plain.named_parameters(), wide.named_parameters(), strict=True):
        if "prolora_A_shard" in name:
            assert b.abs().max() > a.abs().max() * 1.2  # bound 1/√c_A = √2/√d_in instead of 1/√d_in
            assert b.abs().max() <= 1 / math.sqrt(a.shape[1]) + 1e-7
        elif "prolora_A_unshared" in name:
            torch.testing.assert_close(a, b)


def test_plan_resume_and_report(task, tmp_path):
    """Sweep → best learning rate per method → seeds and ablations; then the report and the plot."""
    lrs, seeds = [1e-3, 5e-3], [0, 1]
    assert study.plan("qv_seeds", [], lrs, seeds) == [] and study.plan("qv_ablations", [], lrs, seeds) == []
    results = []
    for stage in ("all7_sweep", "all7_seeds", "all7_ablations"):
        specs = study.plan(stage, results, lrs, seeds)
        assert specs and all(s.key not in {r["key"] for r in results} for s in specs)
        results += [{**study.run(task, s), "base": "tiny", "layers": 0, "steps": 2, "batch": 2} for s in specs]
    chosen = {r["label"]: r["lr"] for r in results if r["stage"] == "seeds"}
    for label, lr in chosen.items():
        sweep = {r["lr"]: r["valid_loss"] for r in results if r["stage"] == "sweep" and r["label"] == label}
        assert lr == min(sweep, key=sweep.get)
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in results))
    assert len(study.read_results(path, {"steps": 2})) == len(results) and not study.read_results(path, {"steps": 3})
    md = tmp_path / "RESULTS.md"
    md.write_text("stale table\n" + study.REPORT_END + "\nkept reading\n")
    regime = study.Regime("tiny", results, lrs, tmp_path / "study" / "plot.png", "python examples/compare_lora.py")
    study.write_report([regime], md)
    text = md.read_text()
    assert "| PRoLoRA |" in text and "LoRA 2x (r=" in text and "no rotation" in text
    assert text.endswith(study.REPORT_END + "\nkept reading\n") and "stale table" not in text
    assert (tmp_path / "study" / "plot.png").stat().st_size > 1000
