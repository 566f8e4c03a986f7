"""Files that let ONNX Runtime GenAI (``onnxruntime_genai.Model(DIR)``) load an export as it is.

Two things are needed beside the decoder graph:

* ``genai_config.json``: the model type, special tokens, context length, the decoder's
  shapes and the names of its inputs and outputs as exported, and search defaults from
  ``generation_config.json``;
* a ``tokenizer.json`` that genai's tokenizer (onnxruntime-extensions) reads as Hugging
  Face does. A byte-level BPE whose pre-tokenizer is ``ByteLevel(use_regex=true)`` and
  whose decoder is a Llama-style sequence (``byte_fallback: true``; the demo model's, from
  its GGUF file) is misread there: −1 ids for spaces and newlines, ``Ġ`` in decoded text,
  and whitespace runs split differently. :func:`genai_tokenizer` rewrites it with the
  same meaning spelled the way genai reads it: the GPT-2 split regex as an explicit
  ``Split`` step, a plain ``ByteLevel`` decoder, no byte fallback. The rewrite is used
  only when the ``tokenizers`` library gives the same ids and the same decoded text for
  both files on :data:`CORPUS`, so what Hugging Face does with the folder never changes.

onnxruntime-genai feeds its adapters (``og.Adapters``) through ONNX Runtime's LoraAdapter,
so our ``.onnx_adapter`` files switch the shards of a compact graph there too.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from ..models import kv_cache_shape

#: model types whose decoder onnxruntime-genai 0.18 runs with the standard names
GENAI_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "granite", "olmo"})

#: GPT-2's pre-tokenizer split, which ``ByteLevel(use_regex=true)`` applies implicitly
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

#: texts on which a rewritten tokenizer must equal the original (spaces, newlines, tabs,
#: unicode, emoji, code, chat-template text)
CORPUS = (
    "Hello world",
    "  two leading spaces, two trailing  ",
    "a  b\n\tc\r\nd",
    "\n\n\nthree newlines",
    "héllo wörld, ß, ﬁ, Ünïcödé",
    "日本語のテキスト、中文文本",
    "emoji 😀🤖🧠 🚀 👍🏽",
    "def f(x):\n    return x + 1\n\n\tif x:\n\t\tpass",
    "I'm sure they'll say we've done it; don't.",
    "numbers 12345 4.5e-3 -7 0x1F",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi\n<|im_end|>\n<|im_start|>assistant\n",
    "    indented\n        more",
    "symbols !!! ??? ... --- *** ###",
)


def _byte_level_pre_tokenizer(spec: dict) -> dict | None:
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return pre
    return None


def _decoder_is_byte_level(decoder: dict | None, vocab: dict[str, int]) -> bool:
    """A decoder whose only effect on this vocabulary is ByteLevel's (the other steps are no-ops:
    no ``<0x..>`` byte tokens for ByteFallback, no ``▁`` for the Replace)."""
    if not decoder:
        return False
    steps = decoder["decoders"] if decoder.get("type") == "Sequence" else [decoder]
    kinds = [step.get("type") for step in steps]
    if "ByteLevel" not in kinds:
        return False
    for step in steps:
        kind = step.get("type")
        if kind == "ByteFallback" and any(t.startswith("<0x") and t.endswith(">") for t in vocab):
            return False
        if kind == "Replace" and any(step.get("pattern", {}).get("String", "") in t for t in vocab):
            return False
        if kind not in ("ByteLevel", "ByteFallback", "Fuse", "Replace"):
            return False
    return True


def genai_tokenizer(spec: dict) -> dict | None:
    """The ``tokenizer.json`` content genai reads like Hugging Face does, or None when ``spec`` needs
    no rewrite or cannot be rewritten with the same meaning (then it is kept as it is)."""
    model = spec.get("model") or {}
    pre = _byte_level_pre_tokenizer(spec)
    if model.get("type") != "BPE" or pre is None:
        return None
    vocab = model.get("vocab") or {}
    if model.get("byte_fallback") or spec.get("decoder", {}).get("type") != "ByteLevel":
        if not _decoder_is_byte_level(spec.get("decoder"), vocab):
            return None
    rewritten = json.loads(json.dumps(spec))
    rewritten["model"]["byte_fallback"] = False
    rewritten["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    rewritten["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GPT2_SPLIT}, "behavior": "Isolated", "invert": False},
        {**pre, "use_regex": False},
    ]}
    return rewritten if same_tokenization(spec, rewritten) else None


def same_tokenization(a: dict, b: dict, corpus: tuple[str, ...] = CORPUS) -> bool:
    """Whether the ``tokenizers`` library gives the same ids and decoded text for both specs."""
    from tokenizers import Tokenizer

    first, second = Tokenizer.from_str(json.dumps(a)), Tokenizer.from_str(json.dumps(b))
    for text in corpus:
        ids = first.encode(text).ids
        if second.encode(text).ids != ids or second.decode(ids) != first.decode(ids):
            return False
    return True


def _token_id(value: Any) -> int | None:
    return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None


def genai_config(config, generation: dict, input_names: list[str], output_names: list[str]) -> dict | None:
    """``genai_config.json`` for a decoder graph with these inputs and outputs, or None when genai
    cannot run it (a model type it does not know, or inputs it does not feed)."""
    if config.model_type not in GENAI_TYPES or "input_ids" not in input_names:
        return None
    known = {"input_ids", "attention_mask", "position_ids"}
    past = [n for n in input_names if n.startswith("past_key_values.")]
    if any(n not in known and n not in past for n in input_names):
        return None  # e.g. adapter_index of a slot graph: genai feeds only the standard inputs
    heads = config.num_attention_heads
    kv_heads, head_size = kv_cache_shape(config)
    inputs = {name: name for name in ("input_ids", "attention_mask", "position_ids") if name in input_names}
    outputs = {"logits": "logits"}
    if past:
        inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
        outputs |= {"present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    eos = generation.get("eos_token_id", config.eos_token_id)
    pad = generation.get("pad_token_id", getattr(config, "pad_token_id", None))
    context = config.max_position_embeddings
    search = {
        "do_sample": bool(generation.get("do_sample", False)),
        "max_length": context,
        "min_length": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": False,
        "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
        "temperature": float(generation.get("temperature", 1.0)),
        "top_k": int(generation.get("top_k", 50)),
        "top_p": float(generation.get("top_p", 1.0)),
    }
    return {
        "model": {
            "type": config.model_type,
            "bos_token_id": _token_id(generation.get("bos_token_id", config.bos_token_id)),
            "eos_token_id": eos,
            "pad_token_id": _token_id(pad if pad is not None else eos),
            "context_length": context,
            "vocab_size": config.vocab_size,
            "decoder": {
                "filename": "model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "log_severity_level": 3, "provider_options": []},
                "head_size": head_size,
                "hidden_size": config.hidden_size,
                "num_attention_heads": heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": kv_heads,
                "inputs": inputs,
                "outputs": outputs,
            },
        },
        "search": search,
    }


def write_genai_files(folder: Path, config) -> str:
    """Write ``genai_config.json`` (and a genai-readable ``tokenizer.json``) into an export folder
    holding ``model.onnx``; returns one line for the export's summary."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    generation_file = folder / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    content = genai_config(config, generation, inputs, [o.name for o in graph.output])
    if content is None:
        return f"no genai_config.json: onnxruntime-genai does not run this graph ({config.model_type})"
    (folder / "genai_config.json").write_text(json.dumps(content, indent=2) + "\n")
    return "; ".join(["genai_config.json written", *filter(None, [rewrite_tokenizer(folder)])])


def rewrite_tokenizer(folder: Path) -> str | None:
    """Respell the folder's ``tokenizer.json`` the way genai reads it (:func:`genai_tokenizer`), in place;
    returns a note for the summary, None when there is nothing to rewrite."""
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        return "no tokenizer.json in the folder"
    rewritten = genai_tokenizer(json.loads(tokenizer_file.read_text(encoding="utf-8")))
    if rewritten is None:
        return None
    tokenizer_file.write_text(json.dumps(rewritten, ensure_ascii=False), encoding="utf-8")
    return "tokenizer.json spelled the way genai reads it (same ids in Hugging Face)"


#: why a slot graph's folder has no genai_config.json (the summary says it)
NO_GENAI_FOR_SLOTS = ("no genai_config.json: onnxruntime-genai feeds only the decoder's standard inputs, not a slot "
                      "graph's adapter_index and slot shards (serve it with prolora_export.engine)")


def fit_builder_config(folder: Path, slots: bool) -> str:
    """Fit the genai_config.json that ONNX Runtime GenAI's model builder wrote to the graph as spliced:
    a compact graph keeps it (genai feeds the standard inputs, the shards keep their defaults and
    ``og.Adapters`` replace them), with ORT's log level at errors, since every overridable shard
    warns at load; a slot graph's is removed (:data:`NO_GENAI_FOR_SLOTS`). The tokenizer is
    respelled for genai as in :func:`write_genai_files`. Returns a note for the summary."""
    config_file = folder / "genai_config.json"
    if not config_file.is_file():
        return "no genai_config.json (the model builder wrote none)"
    if slots:
        config_file.unlink()
        return NO_GENAI_FOR_SLOTS
    config = json.loads(config_file.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["log_severity_level"] = 3
    config_file.write_text(json.dumps(config, indent=4) + "\n")
    return "; ".join(["genai_config.json from the model builder", *filter(None, [rewrite_tokenizer(folder)])])


def genai_model(folder: str | Path, kernel: str = "auto"):
    """``onnxruntime_genai.Model`` of an export folder, with our native ``RotatedShardLoRA`` kernel
    registered for its session when :func:`~prolora_export.runtime.kernel_library` says so (``auto``: when
    it was built; ``function``: never, the graph's function body runs). The library is named at run time
    (``og.Config.overlay``), not in the folder's genai_config.json, which stays portable. The model is
    made with the library's folder as the working directory (genai refuses a library outside the model's
    folder and the working one): not while another thread depends on the working directory."""
    import onnxruntime_genai as og

    from ..runtime import kernel_library

    config = og.Config(str(Path(folder).resolve()))
    library = kernel_library("cpu", kernel)
    if library is None:
        return og.Model(config)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"custom_ops_library": library.name}}}}))
    with contextlib.chdir(library.parent):  # genai loads a library only from the model's folder or the working one
        return og.Model(config)


def genai_greedy(model, prompt_ids: list[int], max_new_tokens: int,
                 adapter: tuple[Any, str] | None = None) -> list[int]:
    """Greedy continuation of ``prompt_ids`` by an ``onnxruntime_genai.Model``, with ``adapter``
    (an ``og.Adapters`` and the name it was loaded under) active when given; it stops at eos, which
    the sequence does not include."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(*adapter)
    generator.append_tokens(list(prompt_ids))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt_ids):]]
