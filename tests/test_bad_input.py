"""Every bad-input class of issue 7 through every command it applies to, as one table.

Each row is (class, CLI args, fragments of the expected message). Each run must end with
exit code 2, exactly one ``error:`` line containing every fragment, no traceback, and the
destination exactly as it was: every writing command runs against an existing output
(with ``--force``, except for the "output exists" rows), whose bytes must not change.
Problems with the destination itself, remote code and damaged training saves follow the
table."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import edit_config, edit_tensors, make_adapter, tiny_llama, truncate
from safetensors.torch import save_file
from test_data import tiny_tokenizer, write_jsonl

from prolora_export.cli import main
from prolora_export.formats.prolora import save_adapter

HP = dict(r=4, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2)
#: the table's model takes either ONNX route: the model builder (transformers 5) or optimum (.venv-optimum)
BUILDER_HIDDEN = 96
FIRST = "model.layers.0.mlp.down_proj.prolora_A_shard"  # the first tensor key, sorted
REMOTE_TYPE = "prolora-test-remote"


# ---------------------------------------------------------------------- broken adapter folders


def _set_first(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[FIRST] = tensors[FIRST].clone()
        tensors[FIRST].view(-1)[3] = value

    return change


def _write(name: str, data: bytes | None) -> Callable[[Path], None]:
    """Replace a file's bytes; None deletes it; b"dir" makes it a folder (unreadable as a file)."""

    def edit(folder: Path) -> None:
        path = folder / name
        path.unlink()
        if data == b"dir":
            path.mkdir()
        elif data is not None:
            path.write_bytes(data)

    return edit


def _huge_module(folder: Path) -> None:
    """Sizes that pass the per-key bounds but would need 2^20 × 2^20 floats per module."""
    data = json.loads((folder / "adapter_config.json").read_text())
    data.update(r=1 << 14, unshared_r=1 << 14)
    data["modules"] = {path: {"in_features": 1 << 20, "out_features": 1 << 20} for path in data["modules"]}
    (folder / "adapter_config.json").write_text(json.dumps(data))


def _rename_module(old: str, new: str) -> Callable[[Path], None]:
    """A consistent adapter (config and tensors agree) for a layer the base model does not have."""

    def edit(folder: Path) -> None:
        data = json.loads((folder / "adapter_config.json").read_text())
        data["modules"] = {new if p == old else p: shape for p, shape in data["modules"].items()}
        (folder / "adapter_config.json").write_text(json.dumps(data))
        edit_tensors(lambda t: t.update({k.replace(old, new): t.pop(k) for k in list(t) if k.startswith(old)}))(folder)

    return edit


BROKEN: dict[str, Callable[[Path], None]] = {
    "cfg_malformed": _write("adapter_config.json", b'{"format": "prolora", "r": '),
    "cfg_truncated": truncate("adapter_config.json"),
    "cfg_not_object": _write("adapter_config.json", b"[1, 2]"),
    "cfg_binary": _write("adapter_config.json", b"\xff\xfe\x00garbage"),
    "cfg_missing": _write("adapter_config.json", None),
    "cfg_unreadable": _write("adapter_config.json", b"dir"),
    "cfg_missing_key": lambda folder: (folder / "adapter_config.json").write_text(
        json.dumps({k: v for k, v in json.loads((folder / "adapter_config.json").read_text()).items() if k != "r"})
    ),
    "st_truncated": truncate("adapter_model.safetensors"),
    "st_garbage": _write("adapter_model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{not json"),
    "st_missing": _write("adapter_model.safetensors", None),
    "t_missing": edit_tensors(lambda t: t.pop(FIRST)),
    "t_extra": edit_tensors(lambda t: t.update({"model.layers.9.self_attn.q_proj.prolora_A_shard": torch.ones(1, 1)})),
    "t_misnamed": edit_tensors(lambda t: t.update({FIRST.replace("A_shard", "A_shrd"): t.pop(FIRST)})),
    "t_shape": edit_tensors(lambda t: t.update({FIRST: torch.zeros(t[FIRST].shape[0] + 1, t[FIRST].shape[1])})),
    "t_int": edit_tensors(lambda t: t.update({FIRST: t[FIRST].to(torch.int32)})),
    "t_nan": edit_tensors(_set_first(float("nan"))),
    "t_inf": edit_tensors(_set_first(float("-inf"))),
    "t_overflow": edit_tensors(lambda t: [t[k].fill_(1e30) for k in t if k.startswith(FIRST.rsplit(".", 1)[0])]),
    "hp_r0": edit_config(r=0),
    "hp_u_gt_r": edit_config(unshared_r=5),
    "hp_m0": edit_config(sharing_rate_a=0),
    "hp_n_neg": edit_config(sharing_rate_b=-1),
    "hp_stride": edit_config(stride_a=3),
    "hp_float": edit_config(r=4.5),
    "hp_string": edit_config(sharing_rate_b="2"),
    "hp_bool": edit_config(unshared_r=True),
    "dim_absurd": edit_config(modules={"model.layers.0.mlp.up_proj": {"in_features": 1 << 40, "out_features": 1}}),
    "dim_huge": _huge_module,
    "module_unknown": _rename_module("model.layers.1.mlp.down_proj", "model.layers.7.mlp.nope_proj"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Every input the table refers to, built once: models, adapters (good and broken), data, ONNX stubs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bad-input")
    paths: dict[str, Path] = {}
    base = tiny_llama(hidden_size=BUILDER_HIDDEN)
    paths["model"] = root / "model"
    base.save_pretrained(paths["model"], safe_serialization=True)
    tiny_tokenizer().save_pretrained(paths["model"])
    adapter = make_adapter(tiny_llama(hidden_size=BUILDER_HIDDEN), **HP)
    paths["ad"] = save_adapter(root / "ad", adapter)

    other = LlamaForCausalLM(
        LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=128)
    )  # fmt: skip
    paths["other_ad"] = save_adapter(root / "other-ad", make_adapter(other, **HP))

    for name, edit in BROKEN.items():
        shutil.copytree(paths["ad"], root / name)
        edit(root / name)
        paths[name] = root / name

    paths["bin_model"] = root / "bin-model"
    paths["bin_model"].mkdir()
    shutil.copy(paths["model"] / "config.json", paths["bin_model"])
    (paths["bin_model"] / "pytorch_model.bin").write_bytes(b"PK\x03\x04 never unpickled")
    paths["empty"] = root / "empty"
    paths["empty"].mkdir()
    paths["a_file"] = root / "a-file.txt"
    paths["a_file"].write_text("not a folder")
    paths["remote"] = _remote_code_model(root / "remote", paths["model"])
    paths["data"] = write_jsonl(root / "train.jsonl", [{"prompt": "what is 1 plus 2 ?", "completion": "3"}] * 4)
    paths["prompts"] = root / "prompts.txt"
    paths["prompts"].write_text("what is 1 plus 2 ?\n")
    paths["model_link"] = root / "model-link"
    paths["model_link"].symlink_to(paths["model"])
    paths["long_prompt"] = root / "long.txt"
    paths["long_prompt"].write_text(" ".join(["what"] * 300) + "\n")  # the tiny Llama has 256 positions
    paths["ids_prompt"] = root / "ids.jsonl"
    paths["ids_prompt"].write_text('{"input_ids": [5, 9, 128]}\n')  # 128: one past the vocabulary
    paths["model_notok"] = root / "model-notok"
    base.save_pretrained(paths["model_notok"], safe_serialization=True)
    paths["loud"] = root / "loud"  # logits ~1e5: fp32 rounding alone exceeds optimum's atol 1e-5
    with torch.no_grad():
        base.lm_head.weight.mul_(1e5)
    base.save_pretrained(paths["loud"], safe_serialization=True)
    paths.update(_other_architectures(root))

    paths["onnx"] = root / "onnx"
    paths["onnx"].mkdir()
    shutil.copy(paths["model"] / "config.json", paths["onnx"])
    x = onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.FLOAT, ["b", "s"])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["b", "s"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["input_ids"], ["logits"])], "stub", [x], [y])
    onnx.save(onnx.helper.make_model(graph), paths["onnx"] / "model.onnx")
    paths["onnx_garbage"] = root / "onnx-garbage"
    shutil.copytree(paths["onnx"], paths["onnx_garbage"])
    (paths["onnx_garbage"] / "model.onnx").write_bytes(b"\xff" * 40)
    paths["onnx_t5"] = root / "onnx-t5"
    shutil.copytree(paths["onnx"], paths["onnx_t5"])
    shutil.copy(paths["t5"] / "config.json", paths["onnx_t5"])
    return {k: str(v) for k, v in paths.items()}


def _other_architectures(root: Path) -> dict[str, Path]:
    """A tiny T5 (encoder-decoder) and a tiny BERT (encoder), each with an adapter."""
    import transformers

    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=128, decoder_start_token_id=0))
    t5.save_pretrained(root / "t5")
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128))
    bert.save_pretrained(root / "bert")
    transformers.BertForMaskedLM(bert.config).save_pretrained(root / "bert-mlm")
    return {
        "t5": root / "t5",
        "t5_ad": save_adapter(root / "t5-ad", make_adapter(t5, target_modules=["q", "v"], r=4, unshared_r=1)),
        "bert": root / "bert",
        "bert_mlm": root / "bert-mlm",
        "bert_ad": save_adapter(root / "bert-ad", make_adapter(bert, target_modules=["query"], r=4, unshared_r=1)),
    }  # fmt: skip


def _remote_code_model(folder: Path, model: Path) -> Path:
    """A model folder whose config asks transformers to import its own Python file (which leaves a marker)."""
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type=REMOTE_TYPE,
        architectures=["RemoteForCausalLM"],
        auto_map={"AutoConfig": "remote_code.RemoteConfig", "AutoModelForCausalLM": "remote_code.RemoteForCausalLM"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "remote_code.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(folder)!r}, 'remote-code-ran').touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"class RemoteConfig(LlamaConfig):\n    model_type = {REMOTE_TYPE!r}\n"
        "class RemoteForCausalLM(LlamaForCausalLM):\n    config_class = RemoteConfig\n"
    )
    return folder


# ---------------------------------------------------------------------- the table


def merge(adapter: str = "{ad}", base: str = "{model}", *extra: str) -> list[str]:
    return ["merge", "--base", base, "--adapter", adapter, "--out", "{out}", "--quiet", "--force", *extra]


def onnx_cmd(adapter: str = "{ad}", base: str = "{model}", mode: str = "merged") -> list[str]:
    return ["onnx", "--base", base, "--adapter", adapter, "--mode", mode, "--out", "{out}", "--force"]


def onnx_adapter(adapter: str = "{ad}") -> list[str]:
    return ["onnx-adapter", "--adapter", adapter, "--out", "{outfile}", "--force"]


def convert(adapter: str = "{ad}", *extra: str) -> list[str]:
    return ["convert", adapter, "--to", "peft", "--out", "{out}", "--force", *extra]


def inspect(adapter: str = "{ad}", *extra: str) -> list[str]:
    return ["inspect", adapter, *extra]


def parity(adapter: str = "{ad}", base: str = "{model}", onnx_dir: str = "{onnx}") -> list[str]:
    return ["parity", "--base", base, "--adapter", adapter, "--onnx", onnx_dir, "--max-new-tokens", "0",
            "--report", "{outfile}"]  # fmt: skip


def train(*extra: str, base: str = "{model}") -> list[str]:
    return ["train", "--base", base, "--data", "{data}", "--out", "{out}", "--force", "--no-progress",
            "--max-steps", "1", "--batch-size", "1", "--max-length", "16", *extra]  # fmt: skip


def without_force(args: list[str]) -> list[str]:
    return [a for a in args if a != "--force"]


CFG = "adapter_config.json"
ST = "adapter_model.safetensors"
MUST = "the output must differ from every input"
OTHER = "an adapter for another model?"
#: optimum's own options (``--opset``, ``--validate``) are refused on the model builder's route
OPTIMUM = ["--graph", "optimum"]
#: (class, command) rows about optimum's refusals (its options, the models only it exports), so run where
#: optimum-onnx is (transformers < 4.58); under transformers 5 without it such a model has no ONNX route
NEEDS_OPTIMUM = {("opset", "onnx"), ("validate_fails", "onnx"), ("encoder_decoder", "onnx"), ("headless", "onnx"),
                 ("remote_code", "onnx")}
CASES: list[tuple[str, list[str], list[str]]] = [
    # missing or unreadable paths
    ("missing_adapter", merge("{root}/nope"), ["nope", "adapter folder not found"]),
    ("missing_adapter", onnx_cmd("{root}/nope"), ["nope", "adapter folder not found"]),
    ("missing_adapter", onnx_adapter("{root}/nope"), ["nope", "adapter folder not found"]),
    ("missing_adapter", convert("{root}/nope"), ["nope", "adapter folder not found"]),
    ("missing_adapter", inspect("{root}/nope"), ["nope", "adapter folder not found"]),
    ("missing_adapter", parity("{root}/nope"), ["nope", "adapter folder not found"]),
    ("adapter_is_file", merge("{a_file}"), ["a-file.txt", "not a folder"]),
    ("adapter_is_file", convert("{a_file}"), ["a-file.txt", "is a file"]),
    ("missing_base", merge(base="{root}/nope"), ["nope", "model folder not found"]),
    ("missing_base", onnx_cmd(base="{root}/nope"), ["nope", "model folder not found"]),
    ("missing_base", parity(base="{root}/nope"), ["nope", "model folder not found"]),
    ("missing_base", train(base="{root}/nope"), ["nope", "model folder not found"]),
    ("missing_base", inspect("{ad}", "--base", "{root}/nope"), ["nope", "model folder not found"]),
    ("missing_base", convert("{ad}", "--base", "{root}/nope"), ["nope", "model folder not found"]),
    ("missing_onnx", parity(onnx_dir="{root}/nope"), ["nope", "ONNX folder not found"]),
    ("onnx_corrupt", parity(onnx_dir="{onnx_garbage}"), ["onnx-garbage", "model.onnx"]),
    ("missing_data", [*train()[:3], "--data", "{root}/nope.jsonl", *train()[5:]], ["nope.jsonl"]),
    ("cfg_unreadable", merge("{cfg_unreadable}"), [CFG, "cannot read"]),
    ("cfg_unreadable", inspect("{cfg_unreadable}"), [CFG, "cannot read"]),
    ("cfg_unreadable", onnx_adapter("{cfg_unreadable}"), [CFG, "cannot read"]),
    # a folder that is neither a model nor an adapter (or the other one)
    ("neither", merge("{empty}"), ["empty", CFG]),
    ("neither", convert("{empty}"), ["empty", "not an adapter folder"]),
    ("neither", inspect("{empty}"), ["empty", "not an adapter folder"]),
    ("neither", onnx_adapter("{empty}"), ["empty", CFG]),
    ("neither", merge(base="{empty}"), ["empty", "not a model folder: no config.json"]),
    ("neither", onnx_cmd(base="{empty}"), ["empty", "not a model folder: no config.json"]),
    ("neither", train(base="{empty}"), ["empty", "not a model folder: no config.json"]),
    ("neither", parity(base="{empty}"), ["empty", "not a model folder: no config.json"]),
    ("neither", parity(onnx_dir="{empty}"), ["empty", "no *.onnx file"]),
    ("adapter_as_base", merge(base="{ad}"), ["ad", "looks like an adapter, not a model"]),
    ("adapter_as_base", train(base="{ad}"), ["ad", "looks like an adapter, not a model"]),
    ("model_as_adapter", convert("{model}"), ["model", "looks like a model folder"]),
    ("model_as_adapter", inspect("{model}"), ["model", "looks like a model folder"]),
    ("model_as_adapter", onnx_cmd("{model}"), ["model", CFG]),
    # malformed or truncated adapter_config.json
    ("cfg_malformed", merge("{cfg_malformed}"), [CFG, "malformed JSON"]),
    ("cfg_malformed", onnx_cmd("{cfg_malformed}"), [CFG, "malformed JSON"]),
    ("cfg_malformed", onnx_adapter("{cfg_malformed}"), [CFG, "malformed JSON"]),
    ("cfg_malformed", parity("{cfg_malformed}"), [CFG, "malformed JSON"]),
    ("cfg_truncated", convert("{cfg_truncated}"), [CFG, "malformed JSON"]),
    ("cfg_truncated", inspect("{cfg_truncated}"), [CFG, "malformed JSON"]),
    ("cfg_truncated", merge("{cfg_truncated}"), [CFG, "malformed JSON"]),
    ("cfg_not_object", merge("{cfg_not_object}"), [CFG, "expected a JSON object"]),
    ("cfg_not_object", inspect("{cfg_not_object}"), [CFG, "expected a JSON object"]),
    ("cfg_binary", convert("{cfg_binary}"), [CFG, "cannot read"]),
    ("cfg_missing", merge("{cfg_missing}"), [CFG, "file not found"]),
    ("cfg_missing", inspect("{cfg_missing}"), [CFG, "not an adapter folder"]),
    ("cfg_missing_key", onnx_adapter("{cfg_missing_key}"), [CFG, "missing key 'r'"]),
    # truncated or corrupted safetensors
    ("st_truncated", merge("{st_truncated}"), [ST, "not a valid safetensors file"]),
    ("st_truncated", onnx_cmd("{st_truncated}", mode="compact"), [ST, "not a valid safetensors file"]),
    ("st_truncated", onnx_adapter("{st_truncated}"), [ST, "not a valid safetensors file"]),
    ("st_truncated", convert("{st_truncated}"), [ST, "not a valid safetensors file"]),
    ("st_truncated", inspect("{st_truncated}"), [ST, "not a valid safetensors file"]),
    ("st_truncated", parity("{st_truncated}"), [ST, "not a valid safetensors file"]),
    ("st_garbage", merge("{st_garbage}"), [ST, "not a valid safetensors file"]),
    ("st_garbage", convert("{st_garbage}"), [ST, "not a valid safetensors file"]),
    ("st_missing", onnx_adapter("{st_missing}"), [ST, "file not found"]),
    ("st_missing", inspect("{st_missing}"), [ST, "file not found"]),
    # missing, extra or misnamed tensors
    ("t_missing", merge("{t_missing}"), [ST, f"missing tensor '{FIRST}' (expected shape [3, 50])"]),
    ("t_missing", onnx_cmd("{t_missing}"), [ST, f"missing tensor '{FIRST}'"]),
    ("t_missing", onnx_adapter("{t_missing}"), [ST, f"missing tensor '{FIRST}'"]),
    ("t_missing", inspect("{t_missing}"), [ST, f"missing tensor '{FIRST}'"]),
    ("t_extra", convert("{t_extra}"), [ST, "unexpected tensor 'model.layers.9.self_attn.q_proj.prolora_A_shard'"]),
    ("t_extra", merge("{t_extra}"), [ST, "unexpected tensor 'model.layers.9.self_attn.q_proj.prolora_A_shard'"]),
    ("t_extra", parity("{t_extra}"), [ST, "unexpected tensor"]),
    ("t_misnamed", merge("{t_misnamed}"), [ST, f"missing tensor '{FIRST}'", "unexpected tensor", "A_shrd"]),
    ("t_misnamed", onnx_adapter("{t_misnamed}"), [ST, f"missing tensor '{FIRST}'", "A_shrd"]),
    # shapes that do not match the config or the base model
    ("t_shape", merge("{t_shape}"), [ST, f"tensor '{FIRST}' has shape [4, 50], expected [3, 50]"]),
    ("t_shape", onnx_cmd("{t_shape}"), [ST, f"tensor '{FIRST}' has shape [4, 50]"]),
    ("t_shape", convert("{t_shape}"), [ST, f"tensor '{FIRST}' has shape [4, 50]"]),
    ("t_int", onnx_adapter("{t_int}"), [ST, f"tensor '{FIRST}' has dtype torch.int32"]),
    ("other_model", merge("{other_ad}"), ["model.layers.0.self_attn.q_proj", "96→96", "48→48", OTHER]),
    ("other_model", onnx_cmd("{other_ad}"), ["model.layers.0.self_attn.q_proj", "96→96", "48→48", OTHER]),
    ("other_model", onnx_cmd("{other_ad}", mode="compact"), ["model.layers.0.self_attn.q_proj", OTHER]),
    ("other_model", parity("{other_ad}"), ["model.layers.0.self_attn.q_proj", OTHER]),
    ("other_model", convert("{other_ad}", "--base", "{model}"), ["model.layers.0.self_attn.q_proj", "96→96"]),
    ("other_model", inspect("{other_ad}", "--base", "{model}"), ["model.layers.0.self_attn.q_proj", "48→48"]),
    ("module_unknown", merge("{module_unknown}"), ["model.layers.7.mlp.nope_proj", "does not exist"]),
    ("module_unknown", onnx_cmd("{module_unknown}"), ["model.layers.7.mlp.nope_proj"]),
    ("module_unknown", convert("{module_unknown}", "--base", "{model}"), ["nope_proj", "does not exist"]),
    # NaN or Inf
    ("t_nan", merge("{t_nan}"), [ST, f"tensor '{FIRST}' contains NaN or Inf"]),
    ("t_nan", onnx_cmd("{t_nan}", mode="compact"), [ST, f"tensor '{FIRST}' contains NaN or Inf"]),
    ("t_nan", onnx_adapter("{t_nan}"), [ST, f"tensor '{FIRST}' contains NaN or Inf"]),
    ("t_nan", convert("{t_nan}"), [ST, f"tensor '{FIRST}' contains NaN or Inf"]),
    ("t_nan", inspect("{t_nan}"), [ST, "contains NaN or Inf"]),
    ("t_nan", parity("{t_nan}"), [ST, "contains NaN or Inf"]),
    ("t_inf", merge("{t_inf}"), [ST, f"tensor '{FIRST}' contains NaN or Inf"]),
    ("t_overflow", merge("{t_overflow}"), [ST, "model.layers.0.mlp.down_proj", "beyond float32 range"]),
    ("t_overflow", onnx_adapter("{t_overflow}"), [ST, "model.layers.0.mlp.down_proj", "beyond float32 range"]),
    # hyperparameters out of range / not integers
    ("hp_r0", merge("{hp_r0}"), [CFG, "'r' must be in [1, 16384], got 0"]),
    ("hp_r0", inspect("{hp_r0}"), [CFG, "'r' must be in [1, 16384], got 0"]),
    ("hp_r0", train("--r", "0"), ["options", "'r' must be in [1, 16384], got 0"]),
    ("hp_r0", inspect("--base", "{model}", "--r", "0"), ["hyperparameters", "'r' must be in"]),
    ("hp_u_gt_r", onnx_cmd("{hp_u_gt_r}"), [CFG, "'unshared_r' must be in [0, r=4], got 5"]),
    ("hp_u_gt_r", train("--r", "4", "--unshared-r", "5"), ["'unshared_r' must be in [0, r=4], got 5"]),
    ("hp_m0", convert("{hp_m0}"), [CFG, "'sharing_rate_a' must be ≥ 1, got 0"]),
    ("hp_m0", train("--sharing-rate-a", "0"), ["'sharing_rate_a' must be ≥ 1, got 0"]),
    ("hp_n_neg", onnx_adapter("{hp_n_neg}"), [CFG, "'sharing_rate_b' must be ≥ 1, got -1"]),
    ("hp_n_neg", train("--sharing-rate-b", "-1"), ["'sharing_rate_b' must be ≥ 1, got -1"]),
    ("hp_stride", merge("{hp_stride}"), [CFG, "'stride_a' must be in [0, r - unshared_r = 3), got 3"]),
    ("hp_stride", parity("{hp_stride}"), [CFG, "'stride_a' must be in [0, r - unshared_r = 3), got 3"]),
    ("option_not_integer", train("--r", "2.5"), ["'--r'", "'2.5' is not a valid integer", "train --help"]),
    ("option_missing", ["merge", "--adapter", "{ad}", "--out", "{out}"], ["Missing option '--base'"]),
    ("hp_float", merge("{hp_float}"), [CFG, "'r' must be an integer, got 4.5"]),
    ("hp_float", inspect("{hp_float}"), [CFG, "'r' must be an integer, got 4.5"]),
    ("hp_string", onnx_cmd("{hp_string}"), [CFG, "'sharing_rate_b' must be an integer, got '2'"]),
    ("hp_bool", convert("{hp_bool}"), [CFG, "'unshared_r' must be an integer, got True"]),
    # dimensions so large they would exhaust memory
    ("dim_absurd", merge("{dim_absurd}"), [CFG, "'in_features' must be an integer in [1, 1048576]"]),
    ("dim_absurd", inspect("{dim_absurd}"), [CFG, "'in_features' must be an integer in [1, 1048576]"]),
    ("dim_absurd", onnx_adapter("{dim_absurd}"), [CFG, "'in_features' must be an integer in [1, 1048576]"]),
    ("dim_huge", merge("{dim_huge}"), [ST, "has shape", "expected [16384, 1048576]"]),
    ("dim_huge", onnx_cmd("{dim_huge}"), [ST, "has shape", "expected [16384, 1048576]"]),
    ("dim_huge", inspect("--base", "{model}", "--r", "100000"), ["'r' must be in [1, 16384], got 100000"]),
    # an unknown target module
    ("target_unknown", train("--target-modules", "nope"), ["no module matches target_modules=['nope']", "q_proj"]),
    ("target_unknown", inspect("--base", "{model}", "--target-modules", "nope"), ["no module matches"]),
    # a base model without safetensors (pickle only)
    ("pickle_only", merge(base="{bin_model}"), ["bin-model", "only pickle weights (pytorch_model.bin)"]),
    ("pickle_only", onnx_cmd(base="{bin_model}"), ["bin-model", "only pickle weights (pytorch_model.bin)"]),
    ("pickle_only", train(base="{bin_model}"), ["bin-model", "only pickle weights", "safe_serialization=True"]),
    ("pickle_only", parity(base="{bin_model}"), ["bin-model", "only pickle weights"]),
    ("pickle_only", inspect("{ad}", "--base", "{bin_model}"), ["bin-model", "only pickle weights"]),
    ("pickle_only", convert("{ad}", "--base", "{bin_model}"), ["bin-model", "only pickle weights"]),
    # custom code in a model folder: refused without --trust-remote-code
    ("remote_code", onnx_cmd(base="{remote}"), ["remote", "auto_map", "--trust-remote-code"]),
    ("remote_code", train(base="{remote}"), ["remote", "auto_map", "--trust-remote-code"]),
    ("remote_code", parity(base="{remote}"), ["remote", "auto_map", "--trust-remote-code"]),
    ("remote_code", inspect("--base", "{remote}"), ["remote", "auto_map", "--trust-remote-code"]),
    ("remote_code", convert("{ad}", "--base", "{remote}"), ["remote", "auto_map", "--trust-remote-code"]),
    # an output that exists (without --force)
    ("out_exists", without_force(merge()), ["already exists (pass --force to replace it)"]),
    ("out_exists", without_force(onnx_cmd()), ["already exists (pass --force to replace it)"]),
    ("out_exists", without_force(onnx_cmd(mode="compact")), ["already exists (pass --force to replace it)"]),
    ("out_exists", without_force(onnx_adapter()), ["already exists (pass --force to replace it)"]),
    ("out_exists", without_force(convert()), ["already exists (pass --force to replace it)"]),
    ("out_exists", without_force(train()), ["already exists (pass --force to replace it)"]),
    # an output that would replace, sit inside or contain an input, however spelled (issue 14, 9)
    ("out_is_input", [*merge()[:5], "--out", "{model}", "--quiet", "--force"], ["is the base model folder", MUST]),
    ("out_is_input", [*merge()[:5], "--out", "{model}/../model", "--quiet", "--force"], ["is the base model folder"]),
    ("out_is_input", [*merge()[:5], "--out", "{model_link}", "--quiet", "--force"], ["is the base model folder"]),
    ("out_is_input", ["convert", "{ad}", "--to", "prolora", "--out", "{ad}", "--force"], ["is the source", MUST]),
    ("out_is_input", [*onnx_cmd()[:7], "--out", "{model}", "--force"], ["is the base model", MUST]),
    ("out_is_input", [*train()[:5], "--out", "{model}", *train()[7:]], ["is the base model", MUST]),
    ("out_is_input", ["onnx-adapter", "--adapter", "{ad}", "--out", "{ad}/../ad", "--force"], ["is a folder"]),
    ("out_in_input", [*merge()[:5], "--out", "{ad}/merged", "--quiet", "--force"], ["is inside the adapter folder"]),
    ("out_in_input", [*onnx_cmd()[:7], "--out", "{model_link}/onnx", "--force"], ["is inside the base model"]),
    ("out_in_input", ["onnx-adapter", "--adapter", "{ad}", "--out", "{ad}/a.onnx_adapter"], ["is inside the adapter"]),
    ("out_in_input", [*parity()[:-1], "{onnx}/report.json"], ["is inside the ONNX folder"]),
    ("out_in_input", [*onnx_adapter()[:3], "--graph", "{onnx}", "--out", "{onnx}/model.onnx", "--force"],
     ["is inside the graph"]),
    ("out_has_input", [*merge()[:5], "--out", "{root}", "--quiet", "--force"], ["contains the base model folder"]),
    ("out_has_input", ["convert", "{ad}", "--to", "peft", "--out", "{ad}/..", "--force"], ["contains the source"]),
    ("out_has_input", [*train()[:5], "--out", "{root}", *train()[7:]], ["contains the base model"]),
    ("out_is_input", ["quantize", "{onnx}", "--out", "{onnx}/../onnx", "--force"], ["is the source", MUST]),
    ("out_in_input", ["quantize", "{onnx}", "--out", "{onnx}/q"], ["is inside the source ONNX folder"]),
    ("out_is_input", [*onnx_cmd()[:7], "--out", "{model_link}", "--quantize", "int8", "--force"], ["is the base"]),
    ("out_is_input", [*parity()[:-2], "--prompts", "{prompts}", "--report", "{prompts}"], ["is the prompts", MUST]),
    # an existing file where a folder is written, or the other way round (issue 14, 9 and 17)
    ("out_wrong_kind", [*merge()[:5], "--out", "{outfile}", "--quiet", "--force"], ["is a file", "is a folder"]),
    ("out_wrong_kind", [*convert()[:4], "--out", "{outfile}", "--force"], ["out.file", "is a file"]),
    ("out_wrong_kind", [*train()[:5], "--out", "{outfile}", *train()[7:]], ["out.file", "is a file"]),
    ("out_wrong_kind", [*onnx_cmd()[:7], "--out", "{outfile}", "--force"], ["out.file", "is a file"]),
    ("out_wrong_kind", [*onnx_adapter()[:3], "--out", "{out}", "--force"], ["is a folder, and the output is a file"]),
    ("out_wrong_kind", [*parity()[:-1], "{out}"], ["is a folder, and the output is a file"]),
    # what the exporter cannot export whole, refused before loading (issue 14, 11 and 16)
    ("encoder_decoder", onnx_cmd("{t5_ad}", base="{t5}"), ["t5 is an encoder-decoder", "encoder alone"]),
    ("encoder_decoder", parity("{t5_ad}", base="{t5}", onnx_dir="{onnx_t5}"), ["t5 is an encoder-decoder"]),
    ("headless", onnx_cmd("{bert_ad}", base="{bert_mlm}"), ["BertForMaskedLM has a head", "--task feature-extraction"]),
    ("opset", [*onnx_cmd(), *OPTIMUM, "--opset", "13"], ["--opset 13 is outside what the exporter supports for llama"]),
    ("opset", [*onnx_cmd(mode="compact"), *OPTIMUM, "--opset", "99"],
     ["--opset 99 is outside what the exporter supports"]),
    ("opset", [*onnx_cmd(), *OPTIMUM, "--opset", "5"], ["--opset 5 is outside what the exporter supports"]),
    # optimum's --validate failing must not exit 0 (issue 14, 20)
    ("validate_fails", [*onnx_cmd(base="{loud}"), *OPTIMUM, "--validate"],
     ["not within the set tolerance", "nothing was written"]),
    # parity inputs that cannot work, refused before any model is loaded (issue 14, 13, 18, 23)
    ("prompt_too_long", [*parity(), "--prompts", "{long_prompt}"], ["prompt 1 has", "more than the model's 256"]),
    ("token_id_unknown", [*parity(), "--prompts", "{ids_prompt}"], ["token id 128 is outside the model's vocabulary"]),
    ("no_tokenizer", parity(base="{model_notok}"), ["no tokenizer", "text prompts need one", '{"input_ids"']),
    ("other_arch", parity("{bert_ad}", base="{bert}"), ["onnx: was exported from a llama model", "bert model"]),
    ("tolerance_nan", [*parity(), "--tolerance", "max_rel=nan"], ["'max_rel=nan'", "finite number"]),
    ("tolerance_nan", [*parity(), "--tolerance", "fp32-cpu,min_cos=-inf"], ["'min_cos=-inf'", "finite number"]),
]


def _fill(args: list[str], world: dict[str, str], tmp_path: Path) -> list[str]:
    names = {**world, "root": str(Path(world["ad"]).parent), "out": str(tmp_path / "out")}
    names["outfile"] = str(tmp_path / "out.file")
    return [a.format_map(names) for a in args]


def _state(path: Path) -> dict[str, bytes] | bytes | None:
    """Everything at ``path``: a folder's files and bytes, a file's bytes, or None."""
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return path.read_bytes() if path.exists() else None


def _prepare_destination(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "previous.txt").write_text("the previous complete output")
    (tmp_path / "out.file").write_bytes(b"previous file output")


def assert_clean_error(result, fragments: list[str]) -> str:
    """Exit 2, one 'error:' line with every fragment, no traceback; returns the line."""
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def run_and_check(args: list[str], fragments: list[str], world: dict[str, str], tmp_path: Path) -> str:
    """Run against an existing destination; the error must be clean and the destination byte-identical."""
    _prepare_destination(tmp_path)
    before = {name: _state(tmp_path / name) for name in ("out", "out.file")}
    line = assert_clean_error(CliRunner().invoke(main, _fill(args, world, tmp_path)), fragments)
    assert {name: _state(tmp_path / name) for name in ("out", "out.file")} == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".out")) == ["out", "out.file"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    return line


def _case_ids() -> list[str]:
    """class-command (onnx: with its mode), numbered from the second row of the same pair on."""
    seen: Counter = Counter()
    ids = []
    for kind, args, _ in CASES:
        name = f"{kind}-{args[0]}" + (f"-{args[args.index('--mode') + 1]}" if "--mode" in args else "")
        seen[name] += 1
        ids.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return ids


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        pytest.param(args, fragments, id=case_id,
                     marks=[pytest.mark.optimum] if (kind, args[0]) in NEEDS_OPTIMUM else [])
        for case_id, (kind, args, fragments) in zip(_case_ids(), CASES, strict=True)
    ],
)
def test_bad_input(world: dict[str, str], tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    run_and_check(args, fragments, world, tmp_path)


def test_every_command_and_class_is_covered() -> None:
    """The table names every command, and every class with an adapter folder appears at least once."""
    commands = {args[0] for _, args, _ in CASES}
    assert commands == {"merge", "onnx", "onnx-adapter", "convert", "inspect", "parity", "train", "quantize"}
    modes = {args[args.index("--mode") + 1] for _, args, _ in CASES if args[0] == "onnx"}
    assert modes == {"merged", "compact"}
    assert set(BROKEN) <= {kind for kind, _, _ in CASES}


def test_real_process_prints_one_line_on_stderr(world: dict[str, str], tmp_path: Path) -> None:
    """Outside CliRunner too: our errors and click's own usage errors are one stderr line, exit 2."""
    cases = ((onnx_adapter("{t_nan}"), "contains NaN or Inf"), (train("--r", "x"), "valid integer"),
             (parity(base="{model_notok}"), "no tokenizer"))  # transformers warned on the way to failing
    for args, fragment in cases:
        cmd = [sys.executable, "-m", "prolora_export", *_fill(args, world, tmp_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 2 and done.stdout == "", (done.returncode, done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and fragment in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.file").exists()


# ---------------------------------------------------------------------- destination problems


def test_output_under_a_file_cannot_be_written(world: dict[str, str], tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    for args in (merge(), convert(), onnx_adapter()):
        args = [a.replace("{out}", "{root}/blocker/out").replace("{outfile}", "{root}/blocker/x") for a in args]
        args = [a.replace("{root}", str(tmp_path)) for a in args]
        assert_clean_error(CliRunner().invoke(main, _fill(args, world, tmp_path)), ["blocker", "not a folder"])
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.parametrize("args", [merge(), onnx_cmd(), convert(), train()], ids=lambda a: a[0])
def test_out_dot_never_replaces_the_current_folder(world: dict[str, str], tmp_path: Path, monkeypatch, args) -> None:
    """``--out . --force`` run from inside a folder would have replaced that folder (issue 14, 9)."""
    _prepare_destination(tmp_path)
    before = _state(tmp_path / "out")
    monkeypatch.chdir(tmp_path / "out")
    args = [a.replace("{out}", ".") for a in args]
    assert_clean_error(CliRunner().invoke(main, _fill(args, world, tmp_path)), ["is the current folder"])
    assert _state(tmp_path / "out") == before


def test_outputs_are_readable_by_other_users(world: dict[str, str], tmp_path: Path) -> None:
    """Under umask 022 every file written is 0644 and every folder 0755, including those written
    through temporary files (safetensors, tempfile), which are 0600 (issue 14, 19)."""
    before = os.umask(0o022)
    try:
        for args in (train("--r", "4"), onnx_adapter(), merge()):
            shutil.rmtree(tmp_path / "out", ignore_errors=True)
            result = CliRunner().invoke(main, _fill(args, world, tmp_path))
            assert result.exit_code == 0, result.output
    finally:
        os.umask(before)
    written = [tmp_path / "out.file", *(tmp_path / "out").rglob("*")]
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert modes == {name: "0o755" if (tmp_path / name).is_dir() else "0o644" for name in modes}
    assert "out/model.safetensors" in modes and "out.file" in modes


@pytest.mark.optimum
def test_failed_validate_prints_only_our_line(world: dict[str, str], tmp_path: Path, capfd) -> None:
    """optimum's own log lines of the failed check went to stderr beside our error (issue 14, 20)."""
    capfd.readouterr()
    result = CliRunner().invoke(main, _fill([*onnx_cmd(base="{loud}"), *OPTIMUM, "--validate"], world, tmp_path))
    assert_clean_error(result, ["logits: max diff"])
    assert "values not close enough" not in capfd.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fetch_demo_failure_is_one_line(tmp_path: Path, monkeypatch) -> None:
    """pip's multi-line stderr used to become a multi-line error (issue 14, 23)."""
    monkeypatch.setenv("PROLORA_EXPORT_CACHE", str(tmp_path / "cache"))
    stderr = "ERROR: Could not find a version\nERROR: No matching distribution\n"
    failed = subprocess.CompletedProcess([], 1, "", stderr)
    monkeypatch.setattr("prolora_export.models.subprocess.run", lambda *args, **kwargs: failed)
    result = CliRunner().invoke(main, ["fetch-demo"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()  # a progress line, then the error on one line
    assert lines[0].startswith("fetching the demo model") and len(lines) == 2, result.output
    assert lines[1].startswith("error: ") and "ERROR: Could not find a version ERROR: No matching" in lines[1]


@pytest.mark.parametrize("args", [merge(), onnx_cmd(), onnx_adapter(), convert(), train()], ids=lambda a: a[0])
def test_output_folder_not_writable(world: dict[str, str], tmp_path: Path, monkeypatch, args: list[str]) -> None:
    """A read-only parent (simulated: the tests run as root, which ignores permissions)."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    run_and_check(args, ["cannot write into this folder (permission denied)", str(tmp_path)], world, tmp_path)


@pytest.mark.parametrize(
    "args",
    [
        merge(),
        convert(),
        onnx_adapter(),
        onnx_cmd(),
        train(),
    ],
    ids=lambda a: a[0],
)
def test_not_enough_free_disk_space(world: dict[str, str], tmp_path: Path, monkeypatch, args: list[str]) -> None:
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 30, (1 << 30) - 4096, 4096))
    run_and_check(args, ["not enough free disk space", "MiB free"], world, tmp_path)


@pytest.mark.parametrize(
    ("args", "target"),
    [
        (merge(), "prolora_export.merge._write_config"),  # after the shards are written
        (convert(), "prolora_export.formats.peft_lora.save_file"),
        (onnx_adapter(), "prolora_export.outputs.os.replace"),
    ],
    ids=["merge", "convert", "onnx-adapter"],
)
def test_disk_full_while_writing(world: dict[str, str], tmp_path: Path, monkeypatch, args, target: str) -> None:
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(target, full)
    run_and_check(args, ["ran out of disk space while writing; nothing was changed"], world, tmp_path)


# ---------------------------------------------------------------------- trust_remote_code


def test_remote_code_runs_only_with_the_flag(world: dict[str, str], tmp_path: Path) -> None:
    """Without the flag nothing from the folder is imported; with it, transformers may import it."""
    marker = Path(world["remote"]) / "remote-code-ran"
    marker.unlink(missing_ok=True)
    assert CliRunner().invoke(main, ["inspect", "--base", world["remote"]]).exit_code == 2
    assert not marker.exists()
    done = CliRunner().invoke(main, ["inspect", "--base", world["remote"], "--trust-remote-code", "--json"])
    assert marker.exists(), done.output
    assert done.exit_code == 0, done.output
    assert len(json.loads(done.output)["layers"]) == 14  # all-linear: 7 projections x 2 blocks


# ---------------------------------------------------------------------- train --resume on a damaged save


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (_write("trainer_state/state.json", b'{"step": '), ["state.json", "malformed JSON"]),
        (_write("trainer_state/state.json", b'{"steps": 1}'), ["state.json", 'integer "step"']),
        (truncate("trainer_state/optimizer.safetensors"), ["optimizer.safetensors", "not a valid safetensors"]),
        (_write("train_log.jsonl", b'{"step": 1, "loss"\n'), ["train_log.jsonl", "cannot read the training log"]),
        (lambda out: shutil.rmtree(out / "trainer_state"), ["no trainer_state/state.json"]),
        (edit_tensors(_set_first(float("nan"))), [ST, "contains NaN or Inf"]),
    ],
    ids=["state-malformed", "state-no-step", "optimizer-truncated", "log-malformed", "state-missing", "adapter-nan"],
)
def test_resume_from_a_damaged_save(world: dict[str, str], tmp_path: Path, damage, fragments: list[str]) -> None:
    """The damaged save is reported in one line and left exactly as it was."""
    first = without_force(_fill(train("--r", "4"), world, tmp_path))
    assert CliRunner().invoke(main, first).exit_code == 0
    damage(tmp_path / "out")
    before = _state(tmp_path / "out")
    resumed = CliRunner().invoke(main, [*first, "--resume"])  # the same settings: any other is refused first
    assert_clean_error(resumed, fragments)
    assert _state(tmp_path / "out") == before


def test_shard_index_cannot_make_merge_write_outside_its_output(world: dict[str, str], tmp_path: Path) -> None:
    """An index naming '../victim/model.safetensors' must be refused, not read and overwritten."""
    from safetensors import safe_open

    victim = tmp_path / "victim"
    victim.mkdir()
    shutil.copy(Path(world["model"]) / "model.safetensors", victim)
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(Path(world["model"]) / "config.json", base)
    save_file({"unused": torch.zeros(1)}, str(base / "other.safetensors"))
    with safe_open(str(victim / "model.safetensors"), "pt") as handle:
        weight_map = {key: "../victim/model.safetensors" for key in handle.keys()}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    before = _state(victim)
    result = CliRunner().invoke(main, _fill(merge(base=str(base)), world, tmp_path))
    assert _state(victim) == before, "merge wrote outside its output folder"
    assert_clean_error(result, ["model.safetensors.index.json", "../victim/model.safetensors"])
