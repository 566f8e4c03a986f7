"""Run ONNX Runtime GenAI's model builder on a Hugging Face folder: the base decoder graph.

Why the builder: its graph (GroupQueryAttention over one shared past/present buffer,
SkipSimplifiedLayerNormalization, no position_ids) decodes 1.37× faster at fp32 than
optimum's traced graph of the same weights, and it runs on transformers 5, which no
optimum-onnx release does (issue 29).

Why a subprocess: the builder needs transformers ≥ 5 and ``onnxruntime-genai``, which may live
in another environment than the caller's (``python`` names its interpreter); it also prints a
page of progress and holds the whole model in memory, which a child process gives back when it
ends. Its failures come back as one line (:func:`_last_error`).

The splice (:mod:`.splice`) depends on the builder's node names, inputs and packing, so only
the versions in :data:`BUILDER_VERSIONS` and the architectures in :data:`ARCHITECTURES` (those
whose graphs the tests check) are accepted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import PRoLoRAError
from ...outputs import atomic_output_dir

BUILDER_PACKAGE = "onnxruntime-genai"
BUILDER_MODULE = "onnxruntime_genai.models.builder"
#: builder versions whose graphs the splice is tested against: [first, last) as (major, minor)
BUILDER_VERSIONS = ((0, 18), (0, 19))
#: the builder imports transformers-5-only model classes at import time
MIN_TRANSFORMERS = (5, 0)
#: config.json ``architectures[0]`` values whose builder graphs name projections as the splice expects
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
EXECUTION_PROVIDERS = ("cpu", "cuda")
#: files the builder's tokenizer step reads (it loads the tokenizer before anything else)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
#: the builder's extra option that keeps Q, K and V as three MatMuls (what the splice needs)
UNPACKED_QKV = {"disable_qkv_fusion": "true"}
#: an adapted module path the builder's graph has a projection for (:func:`projection_node_name`)
MODULE_PATH = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)$")
#: the builder's block names for the Hugging Face module names
BLOCKS = {"self_attn": "attn", "mlp": "mlp"}


def projection_node_name(module_path: str) -> str | None:
    """The builder's MatMul for a Hugging Face module path (None: not a projection it names)."""
    match = MODULE_PATH.match(module_path)
    if match is None:
        return None
    layer, block, name = match.groups()
    return f"/model/layers.{layer}/{BLOCKS[block]}/{name}/MatMul"


@dataclass
class BaseGraph:
    """A builder output folder: ``model.onnx`` (+ ``model.onnx.data``), ``genai_config.json``, tokenizer."""

    folder: Path
    architecture: str
    builder_version: str
    precision: str
    execution_provider: str
    seconds: float

    @property
    def model(self) -> Path:
        return self.folder / "model.onnx"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def installed_versions(python: str | None = None) -> dict[str, str | None]:
    """Versions of the builder and transformers in ``python``'s environment (None: not installed),
    read from package metadata in a child process, so nothing is imported here."""
    script = (
        "import importlib.metadata as m, json\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return None\n"
        f"print(json.dumps({{n: v(n) for n in ({BUILDER_PACKAGE!r}, 'transformers')}}))"
    )
    try:
        done = subprocess.run([python or sys.executable, "-c", script], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise PRoLoRAError(f"cannot run the Python interpreter for the model builder ({err})", python) from None
    return json.loads(done.stdout)


def check_versions(versions: dict[str, str | None], where: str | None = None) -> str:
    """Refuse a builder outside :data:`BUILDER_VERSIONS` or a transformers below 5; returns the builder's version."""
    first, last = BUILDER_VERSIONS
    wanted = f"'{BUILDER_PACKAGE}>={first[0]}.{first[1]},<{last[0]}.{last[1]}'"
    builder = versions.get(BUILDER_PACKAGE)
    if builder is None:
        raise PRoLoRAError(f"the ONNX Runtime GenAI model builder is not installed: pip install {wanted}", where)
    if not first <= _version_tuple(builder)[:2] < last:
        raise PRoLoRAError(f"{BUILDER_PACKAGE} {builder} is not a tested model builder (its node names may differ): "
                           f"pip install {wanted}", where)
    tf = versions.get("transformers")
    if tf is None or _version_tuple(tf)[:2] < MIN_TRANSFORMERS:
        raise PRoLoRAError(f"the model builder needs transformers >= {MIN_TRANSFORMERS[0]} (found {tf or 'none'})",
                           where)
    return builder


def model_architecture(hf_dir: Path) -> str:
    """The folder's ``architectures[0]``, refused unless the splice knows its builder graph."""
    config = hf_dir / "config.json"
    if not config.is_file():
        raise PRoLoRAError("not a Hugging Face model folder (no config.json)", str(hf_dir))
    try:
        names = json.loads(config.read_text()).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PRoLoRAError(f"config.json is not valid JSON ({err})", str(hf_dir)) from None
    name = names[0] if names else "(none)"
    if name not in ARCHITECTURES:
        raise PRoLoRAError(f"architecture {name} has no model-builder route (supported: {', '.join(ARCHITECTURES)})",
                           str(hf_dir))
    return name


def run_builder(
    hf_dir: str | Path,
    out: str | Path,
    precision: str = "fp32",
    execution_provider: str = "cpu",
    *,
    packed: bool = False,
    extra_options: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
    python: str | None = None,
) -> BaseGraph:
    """Build the base graph of ``hf_dir`` into the existing folder ``out`` (no atomicity: see
    :func:`build_base_graph`). ``packed``: keep the builder's one Q/K/V MatMul (the splice needs
    them apart); ``extra_options``: passed to the builder as ``KEY=VALUE``; ``python``: the
    interpreter whose environment has the builder (default: this one)."""
    hf_dir, out = Path(hf_dir), Path(out)
    problems = []
    if precision not in PRECISIONS:
        problems.append(f"unknown precision '{precision}' (expected one of: {', '.join(PRECISIONS)})")
    if execution_provider not in EXECUTION_PROVIDERS:
        problems.append(f"unknown execution provider '{execution_provider}' "
                        f"(expected one of: {', '.join(EXECUTION_PROVIDERS)})")
    if problems:
        raise PRoLoRAError(problems)
    architecture = model_architecture(hf_dir)
    if not any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
        raise PRoLoRAError("the model builder needs the model's tokenizer files in the folder "
                           f"(one of {', '.join(TOKENIZER_FILES)})", str(hf_dir))
    version = check_versions(installed_versions(python), python)
    options = {**({} if packed else UNPACKED_QKV), **(extra_options or {})}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="builder-cache-") as scratch:
        command = [python or sys.executable, "-m", BUILDER_MODULE, "-i", str(hf_dir), "-o", str(out),
                   "-p", precision, "-e", execution_provider, "-c", str(cache_dir or scratch)]
        if options:
            command += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise PRoLoRAError(f"the model builder failed: {_last_error(done.stderr or done.stdout)}", str(hf_dir))
    if not (out / "model.onnx").is_file():
        raise PRoLoRAError("the model builder wrote no model.onnx", str(out))
    return BaseGraph(out, architecture, version, precision, execution_provider, time.perf_counter() - start)


def build_base_graph(
    hf_dir: str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    execution_provider: str = "cpu",
    *,
    force: bool = False,
    **options,
) -> BaseGraph:
    """The builder's graph of the base model in ``hf_dir``, written atomically to ``out_dir``
    (``options``: those of :func:`run_builder`)."""
    with atomic_output_dir(out_dir, force=force) as tmp:
        built = run_builder(hf_dir, tmp, precision, execution_provider, **options)
    built.folder = Path(out_dir)
    return built


def _last_error(text: str) -> str:
    """The line of a child's output that says what went wrong: the exception's, else the last one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (errors or lines or ["no output"])[-1][:300]
