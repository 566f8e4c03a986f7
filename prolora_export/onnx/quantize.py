"""An int4 or int8 base with float PRoLoRA adapters: weight quantization of an exported ONNX folder
with ONNX Runtime's own quantizers (no quantizer of ours).

What is quantized, what stays float:

* ``bits=4``: ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` turns every
  main-graph ``MatMul`` with a constant base weight into ``com.microsoft::MatMulNBits`` (blockwise
  asymmetric 4-bit along K, ``block_size`` rows per scale; ``accuracy_level`` picks the compute
  type of the activations, 4 = int8 on CPU). This covers the attention and MLP projections and
  the ``lm_head``, tied or not: optimum stores a tied head as ``Transpose(embedding)``, which no
  quantizer takes, so :func:`untie_tied_weights` first folds it into an initializer of its own (the
  model builder ties the other way round: ``Gather(Transpose(lm_head weight))``, folded alike). The
  token embedding ``Gather`` becomes ``com.microsoft::GatherBlockQuantized`` (4-bit, blocks along
  the hidden axis): otherwise the fp32 table alone keeps a 135M model's folder above 0.3× its
  fp32 size (SmolLM2's 49152×576 table is 113 MB of its 540 MB).
* ``bits=8``: the same quantizer with 8-bit blocks (``MatMulNBits`` with ``bits=8``: weights int8 in
  blocks of ``block_size`` along K, activations as ``accuracy_level`` says). Not ``quantize_dynamic``
  (``MatMulInteger``): its activations get ONE scale per call, which SmolLM2's few huge activations
  ruin (demo model + demo adapter: held-out loss 3.9x fp32, against 1.01x for 8-bit blocks;
  bench/QUANT-SENSITIVITY.md). The
  embedding ``Gather`` stays fp32 (ORT's block quantizer does Gather in 4 bits only).
* mixed (``bits=4`` with ``int8_modules``): the projections named there (a path component of the
  MatMul's node name: ``v_proj`` matches ``/model/layers.3/self_attn/v_proj/MatMul``) get 8-bit blocks,
  the rest 4-bit, as llama.cpp's Q4_K_M keeps some tensors at more bits. :data:`.quant_settings.SENSITIVE_MODULES` were
  picked with a random adapter (v_proj, down_proj, o_proj cost most there); with the trained demo adapter
  the costliest at 4 bits alone are v_proj, down_proj, up_proj, q_proj (bench/QUANT-SENSITIVITY.md).
* Float, always: norms, rotary tables, attention products, and every tensor of the adapter path.
  The adapter path is protected by name, not by how the quantizer walks the graph: every
  initializer that is also a graph input (that is what makes it overridable by an ONNX Runtime
  adapter) and every SPEC-named shard is collected, each node reading one is passed to the
  quantizer in ``nodes_to_exclude``, and afterwards each of them is checked to be still a graph
  input and an initializer with unchanged bytes, with the ``ai.prolora`` functions and nodes
  intact; anything else is refused (ORT's quantizers *do* quantize a MatMul whose weight is an
  overridable initializer, and drop it from the graph inputs). The compact op's body lives in a
  model-local function, which the quantizers do not enter, so its MatMuls stay fp32.

External data: a source folder with external data (a model over 2 GB) gets it again, in
``model.onnx_data``; the quantized graph of a smaller model is one file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..errors import PRoLoRAError
from ..models import copy_model_side_files, resolve_model
from ..outputs import atomic_output_dir, check_destination, check_free_space
from ..shards import TENSOR_NAMES
from . import op
from .graph.packing import PACKS
from .quant_settings import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, QUANTIZE, check_settings

#: ops a quantized graph holds (MatMulInteger: int8 graphs of earlier versions, quantize_dynamic)
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized", "MatMulInteger")
DATA_FILE = "model.onnx_data"
#: metadata_props key of a quantized graph: the JSON of how its weights were quantized (:func:`record_settings`)
RECORD_KEY = "prolora.quantization"
TWO_GB = 2**31


@dataclass
class QuantizeReport:
    """What a quantization produced, for the CLI to print."""

    out: Path
    bits: int
    block_size: int
    accuracy_level: int
    int8_modules: tuple[str, ...]
    quantized: dict[str, int]  # op type written (MatMulNBits by bits) -> count
    protected_tensors: int
    protected_nodes: int
    bytes_before: int
    bytes_after: int
    seconds: float
    embeddings: str = ""
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ops = ", ".join(f"{n} {k}" for k, n in sorted(self.quantized.items()))
        settings = f"block {self.block_size}, accuracy level {self.accuracy_level}"
        if self.int8_modules:
            settings += f", int8: {', '.join(self.int8_modules)}"
        return (
            f"int{self.bits} ({settings}): {ops}; embeddings {self.embeddings}; {self.protected_tensors} adapter "
            f"tensors kept float and overridable ({self.protected_nodes} nodes excluded); "
            f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
            f"({self.bytes_after / max(self.bytes_before, 1):.2f}×) in {self.out} in {self.seconds:.1f} s"
        )


def _nbits(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "bits"), 4)


def quantized_bits(graph: onnx.GraphProto) -> int | None:
    """The fewest bits of the graph's quantized weights (4 for a mixed int4/int8 graph), None for a float graph."""
    bits = {_nbits(n) if n.op_type == "MatMulNBits" else 4 if n.op_type == "GatherBlockQuantized" else 8
            for n in graph.node if n.op_type in QUANTIZED_OPS}
    return min(bits, default=None)


def adapter_tensor_names(graph: onnx.GraphProto) -> set[str]:
    """Every initializer of the adapter path: the overridable ones (also graph inputs) and the SPEC-named shards."""
    initializers = {i.name for i in graph.initializer}
    overridable = initializers & {i.name for i in graph.input}
    spec_named = {name for name in initializers if name.rsplit(".", 1)[-1] in TENSOR_NAMES}
    return overridable | spec_named


def protected_nodes(graph: onnx.GraphProto, names: set[str]) -> list[str]:
    """Names of the main-graph nodes that read an adapter tensor or are the adapter op, naming
    unnamed ones first (the quantizers exclude nodes by name)."""
    taken = {n.name for n in graph.node if n.name}
    out = []
    for index, node in enumerate(graph.node):
        if node.domain == op.DOMAIN or any(i in names for i in node.input):
            if not node.name:
                candidates = (f"prolora_protected_{index}_{k}" for k in range(len(taken) + 1))
                node.name = next(c for c in candidates if c not in taken)
                taken.add(node.name)
            out.append(node.name)
    return out


def _fingerprint(model: onnx.ModelProto, names: set[str]) -> dict:
    """What must survive quantization unchanged: each adapter tensor (dtype, dims, bytes, still a graph
    input), the model-local functions and every ai.prolora node."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    inits = {i.name: i for i in graph.initializer}
    tensors = {}
    for name in names:
        tensor = inits.get(name)
        if tensor is None:
            tensors[name] = None
            continue
        raw = onnx.numpy_helper.to_array(tensor).tobytes()
        tensors[name] = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).hexdigest(), name in inputs)
    nodes = sorted(n.SerializeToString(deterministic=True) for n in graph.node if n.domain == op.DOMAIN)
    # what the adapter files are checked against (onnx.adapters: the geometry record and its fingerprint)
    metadata = sorted((p.key, p.value) for p in model.metadata_props if p.key.startswith("prolora."))
    functions = sorted(f.SerializeToString(deterministic=True) for f in model.functions)
    return {"tensors": tensors, "nodes": nodes, "functions": functions, "metadata": metadata}


def check_adapter_path(before: dict, after: dict, where: str) -> None:
    """Refuse a quantized graph in which any adapter tensor, adapter node or function changed."""
    changed = sorted(name for name, print_ in before["tensors"].items() if after["tensors"].get(name) != print_)
    if changed:
        gone = [n for n in changed if after["tensors"].get(n) is None]
        what = "removed" if gone else "changed or no longer a graph input"
        raise PRoLoRAError(f"internal: the quantizer {what}: {len(changed)} adapter tensor(s), e.g. {changed[0]}; "
                           "refusing to write a graph whose adapter cannot be switched", where)
    if before["nodes"] != after["nodes"] or before["functions"] != after["functions"]:
        raise PRoLoRAError(f"internal: the quantizer changed the {op.DOMAIN} nodes or functions; refusing", where)
    if before["metadata"] != after["metadata"]:
        raise PRoLoRAError("internal: the quantizer dropped the graph's prolora.* metadata; refusing", where)


def embedding_gathers(graph: onnx.GraphProto, excluded: set[str]) -> list[str]:
    """Gather nodes that look up rows of a 2-D float initializer (the token embedding)."""
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2}
    return [n.name for n in graph.node
            if n.op_type == "Gather" and n.name not in excluded and n.input and n.input[0] in floats
            and not any(a.name == "axis" and a.i != 0 for a in n.attribute)]


#: op → (the input through which it may read a tied table transposed, what it is): optimum's lm_head
#: ``MatMul(x, Transpose(E))``, the model builder's embedding ``Gather(Transpose(H), ids)`` (:func:`untie_tied_weights`)
TRANSPOSED_READERS = {"MatMul": (1, "lm_head"), "Gather": (0, "embedding")}


def untie_tied_weights(graph: onnx.GraphProto, protected: set[str]) -> dict[str, str]:
    """Give the side of a tied embedding/lm_head pair that reads the other's table through a Transpose a
    table of its own, so the quantizers see a constant weight there.

    optimum stores a tied pair as the embedding table and ``MatMul(x, Transpose(embed_tokens.weight))``;
    ONNX Runtime GenAI's model builder as the head's weight and ``Gather(Transpose(lm_head.MatMul.weight),
    ids)``. Neither quantizer takes a computed weight, which would leave the largest matrix of a small
    model (SmolLM2: 576×49152) in fp32: the head (optimum) or the embedding (builder). The Transpose is
    folded into an initializer (``<name>.T``) that the quantizer then replaces; the other side keeps its
    own table. Returns the initializers made, each with what reads it (lm_head or embedding).
    """
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    producers = {out: node for node in graph.node for out in node.output}
    made, folded = {}, []
    for node in graph.node:
        index, role = TRANSPOSED_READERS.get(node.op_type, (None, ""))
        if index is None or node.domain or len(node.input) <= index or node.input[index] not in producers:
            continue
        transpose = producers[node.input[index]]
        source = inits.get(transpose.input[0]) if transpose.op_type == "Transpose" and transpose.input else None
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
        if (source is None or source.name in protected or len(source.dims) != 2 or perm != [1, 0]
                or source.data_type != onnx.TensorProto.FLOAT or consumers[transpose.output[0]] != 1):
            continue
        array = onnx.numpy_helper.to_array(source).T.copy()
        name = f"{source.name}.T"
        graph.initializer.append(onnx.numpy_helper.from_array(array, name))
        node.input[index] = name
        folded.append(transpose)
        made[name] = role
    for transpose in folded:
        graph.node.remove(transpose)
    return made


@contextlib.contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    """ORT's quantizers log one line per node (and a pre-processing hint) through the root and their own
    loggers; errors only while they run."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization")]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, previous, strict=True):
            logger.setLevel(level)


def block_quantize(model: onnx.ModelProto, exclude: list[str], bits: int, block_size: int, accuracy_level: int,
                    gathers: list[str]) -> onnx.ModelProto:
    """One pass of ORT's MatMulNBitsQuantizer: every main-graph MatMul with a constant weight not in
    ``exclude`` to ``bits``-bit blocks along K, and the ``gathers`` (embeddings, 4 bits) along the hidden axis."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level or None,
        quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",),
        quant_axes=(("MatMul", 0), ("Gather", 1)), bits=bits,
    )
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, nodes_to_include=gathers or None,
                                     algo_config=config)
    # an all-zero block (a padded embedding row) has scale 0: the quantizer divides by it, then keeps its own
    # value for such blocks (np.where); numpy's warning about the discarded quotient says nothing to a user
    with np.errstate(divide="ignore", invalid="ignore"):
        quantizer.process()
    return quantizer.model.model


def matmuls_outside(graph: onnx.GraphProto, modules: tuple[str, ...], where: str) -> list[str]:
    """Names of the MatMul nodes of no module in ``modules``; a module that names no MatMul is refused (a
    typo would otherwise quantize everything to int4), saying which packed projection holds it where the
    graph packs it (the model builder's merged graphs: ``qkv_proj``)."""
    others, seen = [], set()
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        hits = set(modules) & set(node.name.split("/"))
        if not hits:
            others.append(node.name)
        seen |= hits
    missing = [m for m in modules if m not in seen]
    if missing:
        packs = [pack for pack, names in PACKS.items()
                 if missing[0] in names and any(pack in name.split("/") for name in others)]
        packed = f"; it packs {', '.join(PACKS[packs[0]])} into one {packs[0]}: name that" if packs else ""
        raise PRoLoRAError(f"no MatMul of module {missing[0]!r} in this graph (node names look like "
                           f"{others[0] if others else 'nothing'}){packed}", where)
    return others


def _quantize(model: onnx.ModelProto, exclude: list[str], bits: int, block_size: int, accuracy_level: int,
              int8_modules: tuple[str, ...], where: str) -> onnx.ModelProto:
    """int8, int4, or int4 with ``int8_modules`` at 8 bits (an 8-bit pass on those first: the 4-bit pass then
    sees MatMulNBits, not MatMul, there)."""
    if int8_modules:
        others = matmuls_outside(model.graph, int8_modules, where)
        model = block_quantize(model, exclude + others, 8, block_size, accuracy_level, [])
    gathers = embedding_gathers(model.graph, set(exclude)) if bits == 4 else []
    return block_quantize(model, exclude, bits, block_size, accuracy_level, gathers)


def _onnx_file(folder: Path) -> Path:
    if not folder.is_dir():
        raise PRoLoRAError("ONNX folder not found" if not folder.exists() else "not a folder", str(folder))
    path = folder / "model.onnx"
    if not path.is_file():
        raise PRoLoRAError("no model.onnx in the folder (expected a folder from prolora-export onnx)", str(folder))
    return path


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and "onnx" in p.name)


def record_settings(model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int,
                    int8_modules: tuple[str, ...]) -> None:
    """Record how the weights were quantized (``prolora.quantization``): the parity gate rebuilds its reference
    with the same method and scheme (prolora_export.parity.quantized)."""
    import json

    entry = model.metadata_props.add()
    entry.key = RECORD_KEY
    entry.value = json.dumps({"method": "rtn", "symmetric": False, "bits": bits, "block_size": block_size,
                              "accuracy_level": accuracy_level, "int8_modules": list(int8_modules),
                              "quantizer": "onnxruntime MatMulNBitsQuantizer"})


def write_quantized(src: Path, dst: Path, bits: int, block_size: int, accuracy_level: int,
                    int8_modules: tuple[str, ...] = ()) -> QuantizeReport:
    """Quantize ``src/model.onnx`` into the existing folder ``dst`` (no atomicity: see :func:`quantize_onnx`)."""
    started = time.perf_counter()
    path = _onnx_file(src)
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path))  # external data too: the quantizers need the weights' values
    except (DecodeError, ValueError, OSError) as err:
        raise PRoLoRAError(f"not a valid ONNX model ({str(err)[:200] or type(err).__name__})", str(path)) from None
    external = _has_external_data(onnx.load(str(path), load_external_data=False))
    graph = model.graph
    if quantized_bits(graph) is not None:
        raise PRoLoRAError(f"already quantized (int{quantized_bits(graph)}); quantize the fp32 export instead",
                           str(path))
    if graph.output and graph.output[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise PRoLoRAError("only fp32 exports can be quantized (this graph's outputs are not float32)", str(path))
    names = adapter_tensor_names(graph)
    untied = untie_tied_weights(graph, names)
    exclude = protected_nodes(graph, names)
    before = _fingerprint(model, names)
    embeddings = "int4 GatherBlockQuantized" if bits == 4 and embedding_gathers(graph, set(exclude)) else "fp32 Gather"
    if untied:
        embeddings += "".join(f", tied {role} quantized from its own transposed copy ({name})"
                              for name, role in untied.items())
    with _quiet_ort_logging():
        quantized = _quantize(model, exclude, bits, block_size, accuracy_level, int8_modules, str(path))
    check_adapter_path(before, _fingerprint(quantized, names), str(path))
    record_settings(quantized, bits, block_size, accuracy_level, int8_modules)
    counts: dict[str, int] = {}
    for node in quantized.graph.node:
        if node.op_type in QUANTIZED_OPS:
            kind = f"{node.op_type} int{_nbits(node)}" if node.op_type == "MatMulNBits" else node.op_type
            counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        raise PRoLoRAError("no MatMul with a constant weight to quantize in this graph", str(path))
    target = dst / "model.onnx"
    if external or quantized.ByteSize() >= TWO_GB:
        onnx.save(quantized, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save(quantized, str(target))
    copy_model_side_files(src, dst, overwrite=False)
    return QuantizeReport(
        out=dst, bits=bits, block_size=block_size, accuracy_level=accuracy_level, int8_modules=int8_modules,
        quantized=counts,
        protected_tensors=len(names), protected_nodes=len(exclude), bytes_before=_folder_bytes(src),
        bytes_after=_folder_bytes(dst), seconds=time.perf_counter() - started, embeddings=embeddings,
        files=sorted(p.name for p in dst.iterdir()),
    )


def quantize_onnx(
    src_dir: str | Path,
    out_dir: str | Path,
    bits: int = 4,
    block_size: int = DEFAULT_BLOCK_SIZE,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    force: bool = False,
    int8_modules: tuple[str, ...] = (),
) -> QuantizeReport:
    """Quantize the base weights of an exported folder (merged or compact) into ``out_dir``, atomically,
    with the folder's side files (config, tokenizer …); the adapter path stays float (module doc).
    ``int8_modules`` (int4 only): projections kept at 8 bits, e.g. :data:`.quant_settings.SENSITIVE_MODULES`."""
    int8_modules = tuple(int8_modules)
    check_settings(bits, block_size, accuracy_level, int8_modules)
    src, out = Path(src_dir), Path(out_dir)
    _onnx_file(src)
    check_destination(out, force, inputs={"source ONNX folder": src})
    check_free_space(out.absolute(), _folder_bytes(src) + (64 << 20))
    with atomic_output_dir(out, force=force) as tmp:
        report = write_quantized(src, tmp, bits, block_size, accuracy_level, int8_modules)
    report.out = out
    return report


def export_quantized(base: str, adapter: str | Path, out: str | Path, quantize: str, block_size: int,
                     accuracy_level: int, force: bool = False, int8_modules: tuple[str, ...] = (), **export_kwargs):
    """``export_onnx`` to a scratch folder beside ``out``, then :func:`quantize_onnx` into ``out``.
    Returns (export report, quantize report)."""
    from .export import export_onnx

    if quantize not in QUANTIZE:
        raise PRoLoRAError(f"unknown quantization '{quantize}' (expected one of: {', '.join(QUANTIZE)})")
    bits = QUANTIZE[quantize]
    out = Path(out)
    if bits is None:
        return export_onnx(base, adapter, out, force=force, **export_kwargs), None
    int8_modules = tuple(int8_modules)
    check_settings(bits, block_size, accuracy_level, int8_modules)
    if export_kwargs.get("dtype", "fp32") != "fp32":
        raise PRoLoRAError("--quantize needs --dtype fp32 (the quantizers take a float32 graph)")
    adapters = [adapter] if isinstance(adapter, (str, Path)) else list(adapter)
    # export_onnx checks its inputs against the scratch folder only: --out is checked against them here
    inputs = [("base model", resolve_model(base)), *(("adapter folder", a) for a in adapters)]
    check_destination(out, force, inputs=inputs)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.fp32-", dir=out.absolute().parent))
    try:
        exported = export_onnx(base, adapter, scratch / "fp32", **export_kwargs)
        report = quantize_onnx(scratch / "fp32", out, bits, block_size, accuracy_level, force=force,
                               int8_modules=int8_modules)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    exported.out = out
    return exported, report


__all__ = [
    "QuantizeReport",
    "adapter_tensor_names",
    "block_quantize",
    "check_adapter_path",
    "export_quantized",
    "matmuls_outside",
    "protected_nodes",
    "quantize_onnx",
    "quantized_bits",
]
