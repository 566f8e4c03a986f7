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
whose graphs tests/test_graph_builder.py and tests/test_graph_architectures.py check against
PyTorch) are accepted, and on the CPU only head sizes its GroupQueryAttention runs
(:data:`CPU_HEAD_SIZE_MULTIPLE`).

Options passed to the builder (``--extra_options``): a full-length KV cache on every layer
(:data:`FULL_KV_CACHE`); for graphs to splice, the packing that gives one MatMul per Hugging Face
projection module (:data:`ARCHITECTURES`); for ``-p int4``/``-p int8`` ``block_size`` and
``accuracy_level`` (:func:`quantization_options`). Everything else is the builder's default:
symmetric weight-only MatMulNBits (``algo_config=default``) of every MatMul, the embedding and
norms float. After the builder, the LM head reads its input from a ``logits_start`` position on
(:mod:`.logits`: a prefill computes only the logits it needs; by default every position's, as the builder's).

Merged mode (:func:`build_merged`) is the builder on our streaming merge's output, and
:func:`choose_graph` is ``onnx --graph``: which decoders take this route, which stay with optimum.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import PRoLoRAError
from ...models import copy_model_side_files
from ...outputs import atomic_output_dir, check_destination
from ..quant_settings import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, check_settings

if TYPE_CHECKING:  # onnx is imported where graphs are read, not for the CLI's route choice
    import onnx

    from ...formats.reference import ReadOptions

BUILDER_PACKAGE = "onnxruntime-genai"
BUILDER_MODULE = "onnxruntime_genai.models.builder"
#: the distribution of the optimum route's exporter (the ``onnx`` extra)
OPTIMUM_PACKAGE = "optimum-onnx"
#: builder versions whose graphs the splice is tested against: [first, last) as (major, minor)
BUILDER_VERSIONS = ((0, 18), (0, 19))
#: the builder imports transformers-5-only model classes at import time
MIN_TRANSFORMERS = (5, 0)
PRECISIONS = ("fp32", "fp16", "int8", "int4")
#: precisions whose projections the builder writes as ``com.microsoft::MatMulNBits`` (weight-only, blockwise)
QUANTIZED_PRECISIONS = {"int4": 4, "int8": 8}
EXECUTION_PROVIDERS = ("cpu", "cuda")
#: files the builder's tokenizer step reads (it loads the tokenizer before anything else)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
#: the builder's extra option that keeps Q, K and V as three MatMuls, one per ``q_proj``/``k_proj``/``v_proj``
#: module (0.18 spells it ``fuse_qkv``, its older ``disable_qkv_fusion`` is a deprecated alias)
UNPACKED_QKV = {"fuse_qkv": "false"}
#: the builder's extra option that writes gate and up as one ``…/mlp/gate_up_proj/MatMul`` (then a Split)
FUSED_GATE_UP = {"fuse_mlp_gate_up": "true"}


@dataclass(frozen=True)
class Architecture:
    """What differs in the builder's graph of one architecture, for the splice: the projections its Hugging
    Face model packs itself (Phi-3's ``qkv_proj`` = [Q|K|V], ``gate_up_proj`` = [gate|up]). The builder
    splits those to build, and packs them again in the same order into ``…/attn/qkv_proj/MatMul`` (its
    default) and ``…/mlp/gate_up_proj/MatMul`` (:data:`FUSED_GATE_UP`): one MatMul per module again."""

    packs_qkv: bool = False
    packs_gate_up: bool = False

    def options(self, packed: bool) -> dict[str, str]:
        """The builder's options for a graph with the builder's own packing (``packed``) or with one MatMul
        per Hugging Face projection module (what the splice needs); the model's own packs stay packed."""
        return {**({} if packed or self.packs_qkv else UNPACKED_QKV), **(FUSED_GATE_UP if self.packs_gate_up else {})}


#: config.json ``architectures[0]`` → what differs in its builder graph. In each, the builder names the
#: projection of module ``model.layers.N.{self_attn|mlp}.X`` ``/model/layers.N/{attn|mlp}/X/MatMul``
#: (:func:`projection_node_name`); what else differs between them (Gemma's scaled embedding and 1 + w norms,
#: Gemma-2's soft-capping and sliding window, Granite's multipliers, Qwen-3's Q/K norms, OLMo's weightless
#: LayerNorms) lies outside the projections the splice touches. OLMo's norms are LayerNorms only because the
#: builder runs in builder_entry.py (``patch_olmo_norms``: the builder alone writes RMSNorms, logits 10-20 % off),
#: and an OLMo that clips Q/K/V is refused (:data:`UNBUILT_CONFIG`). Not here: OLMo-2 (no builder path in 0.18);
#: SmolLM3: the builder fails (``KeyError: 'position_ids'``) on its layers without RoPE, every 4th in the
#: released models.
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(),  # SmolLM and SmolLM2 too
    "MistralForCausalLM": Architecture(),
    "Qwen2ForCausalLM": Architecture(),
    "Qwen3ForCausalLM": Architecture(),
    "Phi3ForCausalLM": Architecture(packs_qkv=True, packs_gate_up=True),
    "GemmaForCausalLM": Architecture(),
    "Gemma2ForCausalLM": Architecture(),
    "GraniteForCausalLM": Architecture(),
    "OlmoForCausalLM": Architecture(),
}
#: config.json keys whose non-null value the builder ignores (its graph would not be the model): OLMo's
#: ``clip_qkv`` (Q, K and V clamped to ±clip_qkv, as in OLMo-7B-0424)
UNBUILT_CONFIG = {"clip_qkv": "the model builder does not clip Q, K and V"}
#: every run: a full-length KV cache on every layer. The builder's default gives sliding-window layers
#: (Gemma-2's) a window-sized ring buffer that only onnxruntime-genai's cache manager feeds; parity's loop
#: and the engine grow the past by concatenation (an empty past fails: "KV cache capacity (0) must be at
#: least local_window_size"). Without sliding-window layers the option changes nothing.
FULL_KV_CACHE = {"windowed_kv_cache": "false"}
#: ONNX Runtime's CPU GroupQueryAttention runs head sizes that are multiples of this, and fails others at
#: run time ("head_size shall be a multiple of 16"), after the builder has written a graph without complaint
CPU_HEAD_SIZE_MULTIPLE = 16
#: an adapted module path the builder's graph has a projection for (:func:`projection_node_name`)
MODULE_PATH = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)$")
#: the builder's block names for the Hugging Face module names
BLOCKS = {"self_attn": "attn", "mlp": "mlp"}


def projection_node_name(module_path: str) -> str | None:
    """The builder's float MatMul for a Hugging Face module path (None: not a projection it names)."""
    match = MODULE_PATH.match(module_path)
    if match is None:
        return None
    layer, block, name = match.groups()
    return f"/model/layers.{layer}/{BLOCKS[block]}/{name}/MatMul"


def projection_node(nodes: dict[str, onnx.NodeProto], module_path: str) -> onnx.NodeProto | None:
    """The builder's projection node for a module path, by name: the float ``…/MatMul``, or the
    ``…/MatMul_Q4`` / ``…/MatMul_Q8`` MatMulNBits that its weight-only quantizer makes of it
    (ORT's ``MatMulNBitsQuantizer`` names a quantized node ``{name}_Q{bits}``)."""
    name = projection_node_name(module_path)
    if name is None:
        return None
    found = [nodes[n] for n in (name, *(f"{name}_Q{bits}" for bits in QUANTIZED_PRECISIONS.values())) if n in nodes]
    return found[0] if len(found) == 1 else None


def projection_sizes(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> tuple[int, int] | None:
    """(in, out) features of a projection node: the float weight's shape, or MatMulNBits' K and N attributes
    (its weight initializer is packed blocks); None for anything else."""
    if node.op_type == "MatMul" and node.domain == "" and node.input[1] in weights:
        dims = tuple(weights[node.input[1]].dims)
        return (dims[0], dims[1]) if len(dims) == 2 else None
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
        attrs = {a.name: a.i for a in node.attribute}
        return (attrs["K"], attrs["N"]) if "K" in attrs and "N" in attrs else None
    return None


def projection_float_type(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> int:
    """The float type a projection computes in: its weight's, or for MatMulNBits its scales' (input 2)."""
    return weights[node.input[2 if node.op_type == "MatMulNBits" else 1]].data_type


@dataclass
class BaseGraph:
    """A builder output folder: ``model.onnx`` (+ ``model.onnx.data``), ``genai_config.json``, tokenizer."""

    folder: Path
    architecture: str
    builder_version: str
    precision: str
    execution_provider: str
    seconds: float
    genai: str | None = None  # set where the folder is finished for onnxruntime-genai (:func:`build_merged`)

    @property
    def model(self) -> Path:
        return self.folder / "model.onnx"

    def summary(self) -> str:
        return (f"model-builder graph ({self.architecture}, {self.precision}, {self.execution_provider}, "
                f"onnxruntime-genai {self.builder_version}) written to {self.folder} in {self.seconds:.1f} s"
                + (f"; {self.genai}" if self.genai else ""))


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


def check_model(hf_dir: Path, execution_provider: str = "cpu") -> str:
    """The folder's ``architectures[0]``, refused unless the splice knows its builder graph, where the graph
    would not be the model (:data:`UNBUILT_CONFIG`), or where it would not run: on the CPU, a head size that
    is not a multiple of :data:`CPU_HEAD_SIZE_MULTIPLE` (``head_dim``, else ``hidden_size / num_attention_heads``,
    as the builder reads it)."""
    config = hf_dir / "config.json"
    if not config.is_file():
        raise PRoLoRAError("not a Hugging Face model folder (no config.json)", str(hf_dir))
    try:
        values = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PRoLoRAError(f"config.json is not valid JSON ({err})", str(hf_dir)) from None
    values = values if isinstance(values, dict) else {}
    names = values.get("architectures") or ["(none)"]
    if names[0] not in ARCHITECTURES:
        raise PRoLoRAError(f"architecture {names[0]} has no model-builder route (supported: "
                           f"{', '.join(ARCHITECTURES)})", str(hf_dir))
    for key, why in UNBUILT_CONFIG.items():
        if values.get(key) is not None:
            raise PRoLoRAError(f"{key} {values[key]}: {why}, so its graph would not be the model", str(hf_dir))
    head = values.get("head_dim") or (values.get("hidden_size") or 0) // (values.get("num_attention_heads") or 1)
    if execution_provider == "cpu" and head % CPU_HEAD_SIZE_MULTIPLE:
        raise PRoLoRAError(f"head size {head}: ONNX Runtime's CPU GroupQueryAttention, which the model builder's "
                           f"graph uses, needs a multiple of {CPU_HEAD_SIZE_MULTIPLE}", str(hf_dir))
    return names[0]


#: ``onnx --graph`` choices: who writes the decoder graph
GRAPHS = ("auto", "builder", "optimum")
#: the optimum tasks the builder's graph stands for (a decoder with its KV cache)
BUILDER_TASKS = ("auto", "text-generation-with-past")


def local_model_dir(base: str | Path) -> Path:
    """A local folder for ``base`` (alias, folder, or a hub id in the HF cache): the builder reads folders."""
    from ...merge import _local_base  # the one place that turns a hub id into a cached folder

    return _local_base(base)


def builder_route_problem(base: str | Path, task: str = "auto", execution_provider: str = "cpu") -> str | None:
    """Why ``base`` has no model-builder route in this environment (None: it has one): a task other than
    a decoder with its KV cache, no builder of a tested version or no transformers 5 here, or a model
    :func:`check_model` refuses."""
    if task not in BUILDER_TASKS:
        return f"the model builder writes decoders with their KV cache (--task {task} is optimum's)"
    try:
        check_versions(installed_versions())
        check_model(local_model_dir(base), execution_provider)
    except PRoLoRAError as err:
        return str(err)
    return None


def optimum_installed() -> bool:
    """Whether optimum's ONNX exporter is installed here (read from package metadata: nothing imported)."""
    try:
        importlib.metadata.version(OPTIMUM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def choose_graph(graph: str, base: str | Path, task: str = "auto", execution_provider: str = "cpu") -> str:
    """``builder`` or ``optimum`` for ``onnx --graph``: ``auto`` takes the builder wherever
    :func:`builder_route_problem` finds none, else optimum where it is installed, else refuses saying why
    neither route is open; ``builder`` refuses in one line where it has a problem."""
    if graph not in GRAPHS:
        raise PRoLoRAError(f"unknown graph '{graph}' (expected one of: {', '.join(GRAPHS)})")
    if graph == "optimum":
        return graph
    problem = builder_route_problem(base, task, execution_provider)
    if problem is None:
        return "builder"
    if graph == "builder":
        raise PRoLoRAError(f"--graph builder: {problem}")
    if not optimum_installed():
        raise PRoLoRAError(f"no ONNX route here: optimum is not installed (pip install 'prolora-export[onnx]', "
                           f"transformers < 4.58) and the model builder has none ({problem})")
    return "optimum"


def quantization_options(precision: str, block_size: int | None, accuracy_level: int | None) -> dict[str, str]:
    """The builder's MatMulNBits options (``block_size``, ``accuracy_level``: the names 0.18 reads for
    int4 and int8) for a quantized precision, checked as ``prolora-export quantize`` checks them;
    None keeps the builder's default (32; accuracy level 4 on the CPU, 0 on CUDA)."""
    given = {k: v for k, v in (("block_size", block_size), ("accuracy_level", accuracy_level)) if v is not None}
    if precision not in QUANTIZED_PRECISIONS:
        if given:
            raise PRoLoRAError(f"{' and '.join(given)} apply to the int4 and int8 precisions only (not {precision})")
        return {}
    check_settings(QUANTIZED_PRECISIONS[precision], block_size or DEFAULT_BLOCK_SIZE,
                   DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level)
    return {k: str(v) for k, v in given.items()}


#: the builder's process runs this file (standalone: the builder's environment may lack this package), which
#: runs the builder with less memory and the same graph: the checkpoint's mapped pages handed back once read,
#: int4/int8 weights quantized one at a time (see its docstring)
BUILDER_ENTRY = Path(__file__).with_name("builder_entry.py")


def run_builder(
    hf_dir: str | Path,
    out: str | Path,
    precision: str = "fp32",
    execution_provider: str = "cpu",
    *,
    packed: bool = False,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    extra_options: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
    python: str | None = None,
) -> BaseGraph:
    """Build the base graph of ``hf_dir`` into the existing folder ``out`` (no atomicity: see
    :func:`build_base_graph`), with the model's side files (config.json, generation config …) that
    the builder does not copy but the rest of the toolchain reads. ``packed``: the builder's own packing
    (one Q/K/V MatMul); else one MatMul per Hugging Face projection module (:meth:`Architecture.options`);
    ``block_size``/``accuracy_level``: int4/int8 only
    (:func:`quantization_options`); ``extra_options``: passed to the builder as ``KEY=VALUE``;
    ``python``: the interpreter whose environment has the builder (default: this one)."""
    hf_dir, out = Path(hf_dir), Path(out)
    problems = []
    if precision not in PRECISIONS:
        problems.append(f"unknown precision '{precision}' (expected one of: {', '.join(PRECISIONS)})")
    if execution_provider not in EXECUTION_PROVIDERS:
        problems.append(f"unknown execution provider '{execution_provider}' "
                        f"(expected one of: {', '.join(EXECUTION_PROVIDERS)})")
    if problems:
        raise PRoLoRAError(problems)
    quantization = quantization_options(precision, block_size, accuracy_level)
    architecture = check_model(hf_dir, execution_provider)
    if not any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
        raise PRoLoRAError("the model builder needs the model's tokenizer files in the folder "
                           f"(one of {', '.join(TOKENIZER_FILES)})", str(hf_dir))
    version = check_versions(installed_versions(python), python)
    options = {**FULL_KV_CACHE, **ARCHITECTURES[architecture].options(packed), **quantization,
               **(extra_options or {})}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="builder-cache-") as scratch:
        command = [python or sys.executable, str(BUILDER_ENTRY), BUILDER_MODULE, "-i", str(hf_dir), "-o", str(out),
                   "-p", precision, "-e", execution_provider, "-c", str(cache_dir or scratch)]
        if options:
            command += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise PRoLoRAError(f"the model builder failed: {_last_error(done.stderr or done.stdout)}", str(hf_dir))
    if not (out / "model.onnx").is_file():
        raise PRoLoRAError("the model builder wrote no model.onnx", str(out))
    copy_model_side_files(hf_dir, out, overwrite=False)  # the builder's tokenizer and genai_config stay
    import onnx

    from .logits import add_logits_start

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)  # the weights stay in model.onnx.data
    if add_logits_start(model):
        onnx.save(model, str(out / "model.onnx"))
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
    check_destination(out_dir, force, inputs=[("base model", hf_dir)])
    with atomic_output_dir(out_dir, force=force) as tmp:
        built = run_builder(hf_dir, tmp, precision, execution_provider, **options)
    built.folder = Path(out_dir)
    return built


def build_merged(
    hf_base: str | Path,
    adapter: str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    execution_provider: str = "cpu",
    *,
    force: bool = False,
    read_options: ReadOptions | None = None,
    **options,
) -> BaseGraph:
    """The builder's graph of ``hf_base`` with ``adapter`` merged into its weights (``onnx --mode merged``):
    :func:`prolora_export.merge.merge_adapters` writes the merged model (fp32, so ΔW is not rounded
    to the base's dtype before the builder casts or quantizes) into a scratch folder inside the
    output's temporary folder, with the base's tokenizer and config; the builder runs on it with its
    own packing (Q/K/V in one MatMul: a plain model has nothing to splice). ``options``: those of
    :func:`run_builder`."""
    from ...merge import merge_adapters
    from ..genai import fit_builder_config

    check_destination(out_dir, force, inputs=[("base model", hf_base), ("adapter folder", adapter)])
    start = time.perf_counter()
    with atomic_output_dir(out_dir, force=force) as tmp:
        merged = tmp / ".merged-model"
        merge_adapters(hf_base, [(adapter, 1.0)], merged, dtype="fp32", progress=False, read_options=read_options)
        built = run_builder(merged, tmp, precision, execution_provider, packed=True, **options)
        shutil.rmtree(merged)
        built.genai = fit_builder_config(tmp, slots=False)
    built.folder, built.seconds = Path(out_dir), time.perf_counter() - start
    return built


def _last_error(text: str) -> str:
    """The line of a child's output that says what went wrong: the exception's, else the last one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (errors or lines or ["no output"])[-1][:300]
