"""The model builder's process: ``python builder_entry.py onnxruntime_genai.models.builder BUILDER_ARGS…`` runs
``python -m onnxruntime_genai.models.builder BUILDER_ARGS…`` with two changes that cut its peak memory
and leave the graph it writes as it was (issue 29: export peak RSS ≤ 2.5× the model's fp32 bytes), and
one that makes its OLMo graph the model (:func:`patch_olmo_norms`).

Why: on the demo model (538 MB as fp32) the builder peaked at 1.1 GB at fp32 and 1.8 GB at int4, beside
~0.42 GB of interpreter, torch, transformers and the builder's imports:

* The checkpoint is memory-mapped (transformers 5 loads safetensors lazily) and every page the builder
  reads while writing the weights stays mapped: 1× the model in RSS by the end, clean file pages that
  nothing reads twice. :class:`PageRelease` hands them back (``madvise(MADV_PAGEOUT)`` on the process's
  ``*.safetensors`` mappings whenever its file-backed RSS has grown by :data:`RELEASE_STEP`). PAGEOUT
  only reclaims: a page the process wrote (copy-on-write, anonymous now) is kept or swapped, never
  dropped, and a clean one is read again from the file if touched again, so nothing the builder
  computes can change.
* int4/int8: the builder's ``to_nbits`` turns the whole float graph into one ModelProto
  (``ir.to_proto``: every weight copied, +1× the model), runs ORT's ``MatMulNBitsQuantizer`` over it and
  converts it back. :func:`patch_quantization` lets it write that float graph (weights streamed to
  ``model.onnx.data`` as at fp32), then :func:`stream_quantize` runs the same quantizer's per-node step
  (``DefaultWeightOnlyQuantizer.quantize``, the code ``to_nbits`` runs, with the same settings) one
  weight at a time, reading it from the data file and writing the packed blocks to the new one: the
  same nodes and the same bytes, one weight in memory. Only the builder's default route is taken
  (method ``default``, QOperator, no per-node overrides, no CUDA prepacking, no pre-quantized
  checkpoint, no subgraphs); anything else runs the builder's own ``to_nbits``.

Standalone on purpose: it runs in the builder's interpreter, whose environment may lack prolora_export
(:func:`..builder.run_builder`'s ``python``), so it imports nothing of the package.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import sys
import threading
from collections.abc import Iterable
from typing import Any

#: ``madvise`` advice that reclaims pages (Linux ≥ 5.4) without changing what the process reads
MADV_PAGEOUT = 21
#: file-backed RSS growth (bytes) that triggers a release, and how often it is looked at (seconds)
RELEASE_STEP = 64 << 20
RELEASE_PERIOD_S = 0.1
#: the checkpoint mappings released: safetensors files (what transformers memory-maps)
MAPPED_SUFFIX = ".safetensors"
#: offsets of the tensors written to the new data file: page-aligned, so each can be memory-mapped
ALIGNMENT = 4096


def _file_rss() -> int:
    """This process's file-backed resident bytes (``RssFile``), 0 where /proc has no such line."""
    try:
        with open("/proc/self/status") as status:
            return next((int(line.split()[1]) * 1024 for line in status if line.startswith("RssFile:")), 0)
    except OSError:
        return 0


def checkpoint_mappings(suffix: str = MAPPED_SUFFIX) -> list[tuple[int, int]]:
    """(start, length) of this process's mappings of files named ``*suffix``."""
    out = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n").endswith(suffix):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    out.append((start, end - start))
    except OSError:  # no /proc: nothing to release
        return []
    return out


class PageRelease(threading.Thread):
    """Reclaim the checkpoint's mapped pages whenever file-backed RSS has grown by ``step`` bytes (a daemon
    thread; :meth:`stop` ends it). Does nothing outside Linux."""

    def __init__(self, step: int = RELEASE_STEP, period: float = RELEASE_PERIOD_S):
        super().__init__(name="prolora-page-release", daemon=True)
        self.step, self.period = step, period
        self._stop_event = threading.Event()
        libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
        self._madvise = getattr(libc, "madvise", None)
        if self._madvise is not None:
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.released = 0  # times it ran madvise, for tests
        self.floor = _file_rss()  # file-backed RSS after the last release (or at creation)

    def release(self) -> int:
        """Advise every checkpoint mapping out now; returns how many mappings the kernel took the advice for
        (an old kernel's EINVAL: nothing released, nothing lost)."""
        if self._madvise is None:
            return 0
        taken = sum(self._madvise(start, length, MADV_PAGEOUT) == 0 for start, length in checkpoint_mappings())
        self.released += 1
        return taken

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            now = _file_rss()
            if now - self.floor >= self.step:
                self.release()
                self.floor = _file_rss()  # what stays (libraries, pages other processes map too) is the new floor
            else:
                self.floor = min(self.floor, now)

    def stop(self) -> None:
        self._stop_event.set()


# ----------------------------------------------------------------------------------------- int4 / int8

def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


class _DataFiles:
    """Reads tensors of the float graph's external data and writes those of the quantized graph."""

    def __init__(self, folder: str, out_name: str):
        self.folder = folder
        self.out_path = os.path.join(folder, out_name + ".tmp")
        self.out_name = out_name
        self.out = open(self.out_path, "wb")
        self.readers: dict[str, int] = {}
        self.written: set[str] = set()  # tensors already in the new file

    @staticmethod
    def where(tensor: Any) -> dict[str, str] | None:
        import onnx

        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return None
        return {e.key: e.value for e in tensor.external_data}

    def read(self, where: dict[str, str]) -> bytes:
        """The bytes of a tensor stored at ``where`` (its external_data entries) in the float graph's files."""
        location = where["location"]
        if location not in self.readers:
            self.readers[location] = os.open(os.path.join(self.folder, location), os.O_RDONLY)
        return os.pread(self.readers[location], int(where["length"]), int(where.get("offset", 0)))

    def load(self, tensor: Any) -> None:
        """Put an external tensor's bytes into its ``raw_data``."""
        import onnx

        where = self.where(tensor)
        if where is not None:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = self.read(where)

    def write(self, tensor: Any, data: bytes) -> None:
        """Store ``data`` as the tensor's bytes in the new data file (its ``raw_data`` cleared)."""
        import onnx

        offset = _aligned(self.out.tell())
        self.out.seek(offset)
        self.out.write(data)
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.out_name), ("offset", str(offset)), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
        self.written.add(tensor.name)

    def copy(self, tensor: Any) -> None:
        """Carry a tensor of the float graph over to the new data file, file to file (one stored in the graph
        stays there)."""
        where = self.where(tensor)
        if where is not None:
            self.write(tensor, self.read(where))

    def close(self) -> None:
        self.out.close()
        for fd in self.readers.values():
            os.close(fd)


def _weight_input(node: Any) -> str | None:
    """The input a weight-only quantizer replaces: MatMul's B, Gather's data."""
    index = {"MatMul": 1, "Gather": 0}.get(node.op_type)
    return node.input[index] if index is not None and len(node.input) > index else None


def stream_quantize(
    model_path: str,
    *,
    bits: int,
    block_size: int,
    is_symmetric: bool,
    accuracy_level: int | None,
    op_types_to_quantize: Iterable[str],
    nodes_to_exclude: Iterable[str] = (),
) -> int:
    """Quantize the float graph at ``model_path`` (external data) in place, as ``MatMulNBitsQuantizer(model,
    bits, block_size, is_symmetric, accuracy_level, nodes_to_exclude, QOperator, op_types_to_quantize).process()``
    would: the same opset and IR updates, each node through the same ``DefaultWeightOnlyQuantizer.quantize``,
    unused initializers removed; one weight in memory at a time. Returns the number of nodes replaced."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )
    from onnxruntime.quantization.quant_utils import QuantFormat

    op_types = tuple(op_types_to_quantize)
    excluded = set(nodes_to_exclude)
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=is_symmetric, accuracy_level=accuracy_level,
        quant_format=QuantFormat.QOperator, op_types_to_quantize=op_types, bits=bits))
    folder, name = os.path.split(os.path.abspath(model_path))
    model = onnx.load(model_path, load_external_data=False)
    _update_opsets(model, op_types)
    graph = model.graph
    data_name = name + ".data"
    files = _DataFiles(folder, data_name)
    replaced, nodes, added = 0, [], []
    try:
        by_name = {t.name: t for t in graph.initializer}
        for node in graph.node:
            weight = by_name.get(_weight_input(node) or "")
            if node.name in excluded or node.op_type not in op_types or weight is None:
                nodes.append(node)
                continue
            # the weight, with its bytes, in a graph of its own: the quantizer finds it there first (innermost
            # graph), adds what it makes there, and all of it is freed before the next weight (a message's
            # arena keeps every byte ever set on it, so nothing large may pass through the model's)
            scratch = onnx.GraphProto()
            scratch.initializer.add().CopyFrom(weight)
            files.load(scratch.initializer[0])
            new = quantizer.quantize(node, [graph, scratch])
            for tensor in scratch.initializer[1:]:  # packed blocks, scales (zero points)
                if tensor.HasField("raw_data"):
                    files.write(tensor, tensor.raw_data)
                graph.initializer.append(tensor)
                added.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
            graph.value_info.extend(scratch.value_info)
            del scratch
            replaced += not (len(new) == 1 and new[0] is node)
            nodes.extend(new)
        graph.ClearField("node")
        graph.node.extend(nodes)
        # as the builder's round trip through onnx_ir leaves it: a value_info for every initializer there is
        removed = _drop_unused_initializers(graph)
        value_info = [v for v in graph.value_info if v.name not in removed] + added
        graph.ClearField("value_info")
        graph.value_info.extend(value_info)
        for tensor in graph.initializer:
            if tensor.name not in files.written:  # a float tensor kept (norms, an unquantized embedding …)
                files.copy(tensor)
    finally:
        files.close()
    temp = model_path + ".tmp"
    onnx.save(model, temp)
    os.replace(files.out_path, os.path.join(folder, data_name))
    os.replace(temp, model_path)
    return replaced


def _update_opsets(model: Any, op_types: tuple[str, ...]) -> None:
    """``MatMulNBitsQuantizer.process``'s updates: ``com.microsoft`` opset 1; with Gather quantized, ai.onnx
    opset ≥ 21 and IR version ≥ 10 (int4 tensors)."""
    imports = {o.domain: o for o in model.opset_import}
    if "com.microsoft" in imports:
        imports["com.microsoft"].version = 1
    else:
        model.opset_import.add(domain="com.microsoft", version=1)
    if "Gather" in op_types:
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version < 21:
                opset.version = 21
        model.ir_version = max(model.ir_version, 10)


def _drop_unused_initializers(graph: Any) -> set[str]:
    """Remove the initializers no node reads and no output names (``ONNXModel.clean_initializers``) and their graph
    inputs; returns their names."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = {t.name for t in graph.initializer if t.name not in used}
    keep = [t for t in graph.initializer if t.name not in unused]
    inputs = [i for i in graph.input if i.name not in unused]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)
    graph.ClearField("input")
    graph.input.extend(inputs)
    return unused


def streamable(builder: Any) -> bool:
    """Whether the builder's ``to_nbits`` would take its plain default route for this model: MatMulNBits
    (QOperator) by ORT's default quantizer with one bit width, no per-node overrides, no CUDA prepacking,
    no pre-quantized checkpoint, and no node with a subgraph (the streaming pass walks the main graph)."""
    import onnx_ir as ir

    attrs = builder.quant_attrs
    subgraph = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
    return (
        builder.quant_type is None
        and not attrs.get("use_qdq", False)
        and getattr(builder, "quantization_algo", "default") == "default"
        and not getattr(builder, "int4_customized_weight_config", None)
        and not getattr(builder, "exact_quant_overrides", None)
        and not getattr(builder, "exact_quant_override_names", None)
        and not (builder.ep == "cuda" and builder.matmul_attrs.get("weights_prepacked", 0) > 0)
        and not any(attr.type in subgraph for node in builder.model.graph for attr in node.attributes.values())
    )


def patch_quantization(model_class: type) -> None:
    """Make ``model_class.save_model`` write int4/int8 graphs through :func:`stream_quantize` where
    :func:`streamable` says the result is the builder's own."""
    original = model_class.save_model

    def save_model(self: Any, out_dir: str) -> None:
        import onnx_ir as ir

        quantized = self.onnx_dtype in {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8}
        if not quantized or not streamable(self):
            original(self, out_dir)
            return
        self.to_nbits = lambda: self.model  # save the float graph; its weights stream to model.onnx.data
        try:
            original(self, out_dir)
        finally:
            del self.to_nbits
        attrs = self.quant_attrs
        count = stream_quantize(os.path.join(out_dir, self.filename), bits=attrs["bits"],
                                block_size=attrs["matmul_block_size"], is_symmetric=attrs["is_symmetric"],
                                accuracy_level=attrs["accuracy_level"],
                                op_types_to_quantize=attrs["op_types_to_quantize"],
                                nodes_to_exclude=attrs["nodes_to_exclude"])
        print(f"Quantized {count} nodes of {self.filename} weight by weight ({attrs['bits']} bits)", flush=True)

    model_class.save_model = save_model


# ----------------------------------------------------------------------------------------- OLMo

#: transformers' ``OlmoLayerNorm`` epsilon (fixed in its code: OlmoConfig has no norm epsilon)
OLMO_NORM_EPS = 1e-5


def patch_olmo_norms(model_class: type) -> None:
    """Make the builder's ``OLMoModel`` write OLMo's norms as what they are: LayerNorms (mean subtracted) with
    epsilon :data:`OLMO_NORM_EPS`. Its class gives them weight 1 and bias 0 but keeps the base class's
    RMSNorm ops (``SimplifiedLayerNormalization``, ``SkipSimplifiedLayerNormalization``) and, with no
    ``rms_norm_eps`` in the config, epsilon 1e-6: logits 10-20 % off on tiny random OLMos. The builder's own
    non-simple route writes ``LayerNormalization`` and ``com.microsoft::SkipLayerNormalization`` with those
    weights and biases, before any quantization, so every precision and every graph built on it gets them."""
    original = model_class.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.layernorm_attrs["simple"] = False
        self.layernorm_attrs["epsilon"] = OLMO_NORM_EPS

    model_class.__init__ = __init__


def main(module: str, argv: list[str]) -> None:
    """Run the builder's ``module`` as ``python -m module *argv`` would, with the page release and the patches."""
    release = PageRelease()
    release.start()
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's own folder on sys.path)
    from builders.base import Model  # the builder's base class, as its modules import it
    from builders.olmo import OLMoModel

    patch_quantization(Model)
    patch_olmo_norms(OLMoModel)
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        release.stop()


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # run by path: this folder's modules (builder.py …) must not shadow the builder's own
    main(sys.argv[1], sys.argv[2:])
