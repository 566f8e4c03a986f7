"""ONNX Runtime adapter files (``.onnx_adapter``) from PRoLoRA adapters.

A compact ONNX graph (``export_onnx(mode="compact")``) has every adapter tensor as an
overridable initializer named like the safetensors key (``P.prolora_A_shard`` …), so an
adapter file is simply the adapter's tensors under the same names. At run time::

    lora = onnxruntime.LoraAdapter(); lora.Load("a.onnx_adapter")
    options = onnxruntime.RunOptions(); options.add_active_adapter(lora)
    session.run(None, feeds, options)

One InferenceSession then serves any number of adapters of the same shape, chosen per call,
provided each file fits what the graph's nodes bake in (γ, rotation tables): see
:func:`check_adapter_fits`, which every place that applies a file calls.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..convert import read_source
from ..errors import PRoLoRAError, raise_if
from ..formats.reference import ReadOptions
from ..outputs import atomic_output_file, check_destination, check_free_space

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass
class AdapterFileReport:
    out: Path
    tensors: int
    parameters: int
    bytes: int

    def summary(self) -> str:
        return (
            f"wrote {self.tensors} tensors ({self.parameters:,} parameters) to {self.out} ({self.bytes / 1024:.1f} KiB)"
        )


def export_onnx_adapter(
    adapter: str | Path,
    out: str | Path,
    dtype: str | None = None,
    force: bool = False,
    base: str | None = None,
    read_options: ReadOptions | None = None,
    graph=None,
) -> AdapterFileReport:
    """Write ``adapter``'s tensors, by SPEC name, as an ONNX Runtime adapter file (atomically).

    ``dtype`` must match the graph the file is used with (default: ``graph``'s, else fp32). The file
    records the geometry and γ it fits (:func:`check_adapter_fits`); with ``graph`` (a compact
    export, anything :func:`read_record` takes) it is made for that graph: a geometry that differs is
    refused, a γ that differs is folded into the B shards, so the file computes this adapter there.
    The folder is read by the one reader: any layout that has shards (``base``: layer sizes where a
    reference checkpoint lacks them; ``read_options``: stated hyperparameters, pickle).
    """
    import onnxruntime as ort

    graph_path = graph if isinstance(graph, (str, Path)) else None
    inputs = {"adapter folder": adapter, "graph": graph_path, "base model": base}
    check_destination(out, force, inputs=inputs, kind="file")
    record = read_record(graph) if graph is not None else None
    dtype = dtype or (record["dtype"] if record else "fp32")
    if dtype not in NUMPY_DTYPES:
        raise PRoLoRAError(f"unknown dtype '{dtype}' (expected one of: {', '.join(NUMPY_DTYPES)})")
    if record is not None and dtype != record["dtype"]:
        raise PRoLoRAError(f"--dtype {dtype} does not match the graph, whose shards are {record['dtype']}")
    loaded = read_source(adapter, base, read_options, compact=True).adapter
    record = record or geometry_record(loaded.config, dtype)
    arrays = fitted_arrays(loaded, record, NUMPY_DTYPES[dtype])
    check_free_space(Path(out).absolute(), sum(a.nbytes for a in arrays.values()) + (1 << 20))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(scaling_version(record["scaling"]))
    fmt.set_model_version(geometry_fingerprint(record))
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    with atomic_output_file(out, force=force) as tmp:
        fmt.export_adapter(str(tmp))
    out = Path(out)
    return AdapterFileReport(out, len(arrays), sum(a.size for a in arrays.values()), out.stat().st_size)


def load_onnx_adapter(path: str | Path, graph=None):
    """An ``onnxruntime.LoraAdapter`` loaded from ``path`` (a clear error when it is missing).

    With ``graph`` (the session or graph it is for) the file is first checked to fit it
    (:func:`check_adapter_fits`): a file that does not would run and be silently wrong.
    """
    import onnxruntime as ort

    if not Path(path).is_file():
        raise PRoLoRAError("ONNX Runtime adapter file not found", str(path))
    if graph is not None:
        check_adapter_fits(path, graph)
    lora = ort.LoraAdapter()
    lora.Load(str(path))
    return lora


def run_options(*adapters) -> object:
    """``RunOptions`` with the given ``LoraAdapter`` objects active (none: the graph's defaults).

    ONNX Runtime's RunOptions does not keep its adapters alive: with
    ``run_options(load_onnx_adapter(f))`` the adapter would be freed at once and the run would
    silently use the graph's defaults. The options returned here hold a reference to each.
    """
    import onnxruntime as ort

    class _AdapterRunOptions(ort.RunOptions):
        adapters: tuple = ()

    options = _AdapterRunOptions()
    options.adapters = adapters
    for lora in adapters:
        options.add_active_adapter(lora)
    return options


def empty_past(spec, batch: int, config=None) -> np.ndarray:
    """An empty KV-cache input (batch, KV heads, 0, head size) of the graph's dtype; sizes the graph leaves
    symbolic (the model builder's ``kv_cache_dim``) come from the model's ``config``."""
    from ..models import kv_cache_shape

    known = {0: batch, 2: 0}
    if config is not None:
        heads, head_size = kv_cache_shape(config)
        known |= {1: heads, 3: head_size}
    shape = [d if isinstance(d, int) else known.get(i, 0) for i, d in enumerate(spec.shape)]
    return np.zeros(shape, dtype=np.float16 if "float16" in spec.type else np.float32)


def decoder_feeds(session, input_ids: np.ndarray, config=None) -> dict[str, np.ndarray]:
    """Inputs for one prefill call of an exported causal LM (``text-generation-with-past``):
    the ids, a full attention mask, positions, and an empty KV cache of the graph's dtype
    (:func:`empty_past`; ``config``, the model's, sizes what the graph leaves symbolic)."""
    batch, length = input_ids.shape
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = input_ids.astype(np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((batch, length), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
        elif inp.name.startswith("past_key_values"):
            feeds[inp.name] = empty_past(inp, batch, config)
    return feeds


# ---------------------------------------------------------------------- what a compact graph bakes in
#
# A compact graph bakes more than the shard shapes into its nodes: γ = α/r (the ``scaling``
# attribute) and the rotation tables (r_s, m, n and the strides; rotation off = strides 0). An
# ``.onnx_adapter`` file holds shard values only, so a file made from an adapter with another
# lora_alpha, or with rotate false, runs on a graph with the same shapes and is silently wrong.
# Hence both record what they were made for: the graph as ``metadata_props`` (the geometry as
# JSON and its fingerprint), the file in the two integers ONNX Runtime's format has room for:
# ``model_version`` = the geometry's fingerprint, ``adapter_version`` = the bits of γ as float32
# (what the nodes carry). A γ difference can be folded into the file's B shards instead
# (``export_onnx_adapter(graph=…)``); a geometry difference cannot, and is refused.

#: metadata_props key of a compact graph: the JSON of :func:`geometry_record`
RECORD_KEY = "prolora.geometry"
#: metadata_props key of a compact graph: the geometry's fingerprint (the model_version of every file that fits)
FINGERPRINT_KEY = "prolora.fingerprint"
#: model_version of files written before files recorded what they fit (fingerprints are ≥ 2)
LEGACY_VERSION = 1
#: record keys that must be equal for a file or adapter to fit (scaling and dtype are checked apart)
GEOMETRY_KEYS = ("r", "unshared_r", "sharing_rate_a", "sharing_rate_b", "stride_a", "stride_b", "modules")


def _float32(value: float) -> float:
    return float(np.float32(value))


def _effective_stride(stride: int, shared_r: int, chunks: int) -> int:
    """The stride as the rotation tables see it: shifts are taken mod r_s, and one chunk never shifts."""
    return 0 if shared_r <= 1 or chunks == 1 else stride % shared_r


def geometry_record(config, dtype: str = "fp32", defaults: str = "adapter") -> dict:
    """What a compact graph made from an adapter with ``config`` computes with, besides the shard
    values: the effective geometry (equal records ⇔ the same rotation tables and shard shapes), γ as
    the float32 the nodes carry, the shards' dtype and what the shards default to (not compared)."""
    first = config.module_geometry(next(iter(config.modules)))
    return {
        "r": config.r,
        "unshared_r": config.unshared_r,
        "sharing_rate_a": config.sharing_rate_a,
        "sharing_rate_b": config.sharing_rate_b,
        "stride_a": _effective_stride(first.stride_a, first.shared_r, first.sharing_rate_a),
        "stride_b": _effective_stride(first.stride_b, first.shared_r, first.sharing_rate_b),
        "modules": {p: [s["in_features"], s["out_features"]] for p, s in sorted(config.modules.items())},
        "scaling": _float32(config.scaling),
        "dtype": dtype,
        "defaults": defaults,
    }


def geometry_fingerprint(record: dict) -> int:
    """A 31-bit fingerprint of the record's geometry (scaling and dtype excluded), never 0 or 1."""
    text = json.dumps({k: record[k] for k in GEOMETRY_KEYS}, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % (2**31 - 2) + 2


def scaling_version(scaling: float) -> int:
    """γ as float32 bits in a signed int32 (``adapter_version`` of a file): exact and readable back."""
    return struct.unpack("<i", struct.pack("<f", scaling))[0]


def version_scaling(version: int) -> float:
    """The γ a file's ``adapter_version`` holds (:func:`scaling_version` inverted)."""
    return struct.unpack("<f", struct.pack("<i", version))[0]


def record_geometry(model, record: dict) -> None:
    """Write the record and its fingerprint into an ONNX ModelProto's metadata_props (replacing old ones)."""
    kept = [p for p in model.metadata_props if p.key not in (RECORD_KEY, FINGERPRINT_KEY)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    values = {RECORD_KEY: json.dumps(record, sort_keys=True), FINGERPRINT_KEY: str(geometry_fingerprint(record))}
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def read_record(graph) -> dict:
    """The geometry record of a compact graph: ``graph`` is an InferenceSession, an onnx ModelProto,
    its ``metadata_props`` as a dict (``session.get_modelmeta().custom_metadata_map``), a ``.onnx``
    file, an exported folder, or a record already read."""
    where = None
    if hasattr(graph, "get_modelmeta"):
        meta = dict(graph.get_modelmeta().custom_metadata_map)
    elif hasattr(graph, "metadata_props"):
        meta = {p.key: p.value for p in graph.metadata_props}
    elif isinstance(graph, dict) and RECORD_KEY not in graph and "modules" in graph:
        return graph  # a record already read
    elif isinstance(graph, dict):
        meta = graph
    else:
        import onnx

        path = Path(graph)
        if path.is_dir():
            named = sorted(path.glob("*.onnx"))
            path = next((p for p in named if p.name == "model.onnx"), named[0] if named else path / "model.onnx")
        where = str(path)
        if not path.is_file():
            raise PRoLoRAError("ONNX graph not found", where)
        try:
            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as err:  # protobuf and onnx raise several types for a damaged file
            raise PRoLoRAError(f"not a valid ONNX model ({str(err)[:200] or type(err).__name__})", where) from None
    if RECORD_KEY not in meta:
        raise PRoLoRAError(
            f"the graph records no PRoLoRA geometry ({RECORD_KEY} metadata): adapter files apply to graphs of "
            "`prolora-export onnx --mode compact` only (export compact graphs made before this record again)",
            where,
        )
    return json.loads(meta[RECORD_KEY])


def _describe(record: dict) -> str:
    strides = f"s_A={record['stride_a']}, s_B={record['stride_b']}"
    return (
        f"r={record['r']}, u={record['unshared_r']}, m={record['sharing_rate_a']}, n={record['sharing_rate_b']}, "
        f"{strides}{' (no rotation)' if record['stride_a'] == record['stride_b'] == 0 else ''}, "
        f"{len(record['modules'])} layers"
    )


def _geometry_problems(mine: dict, graph: dict) -> list[str]:
    """What differs between two records' geometries, key by key (modules: the first few layers)."""
    problems = [
        f"{key} is {mine[key]} here but {graph[key]} in the graph"
        for key in GEOMETRY_KEYS
        if key != "modules" and mine[key] != graph[key]
    ]
    ours, theirs = mine["modules"], graph["modules"]
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    resized = [p for p in sorted(set(ours) & set(theirs)) if ours[p] != theirs[p]]
    problems += [f"layer '{p}' is adapted in the graph but not here" for p in missing[:3]]
    problems += [f"layer '{p}' is adapted here but not in the graph" for p in extra[:3]]
    problems += [f"layer '{p}' is {ours[p][0]}→{ours[p][1]} here but {theirs[p][0]}→{theirs[p][1]} in the graph"
                 for p in resized[:3]]
    return problems


def _file_problems(fmt, graph: dict) -> list[str]:
    """What stops an ``onnxruntime.AdapterFormat`` from fitting the graph with ``graph``'s record."""
    from ..shards import ShardGeometry

    if fmt.get_model_version() == LEGACY_VERSION:
        return ["written before .onnx_adapter files recorded the geometry and scaling they fit; write it again "
                "with `prolora-export onnx-adapter`"]
    expected = {}
    for path, (d_in, d_out) in graph["modules"].items():
        g = ShardGeometry.build(d_in, d_out, graph["r"], graph["unshared_r"], graph["sharing_rate_a"],
                                graph["sharing_rate_b"], True, graph["stride_a"], graph["stride_b"])
        expected.update({f"{path}.{name}": list(shape) for name, shape in g.tensor_shapes().items()})
    params = fmt.get_parameters()
    problems = [f"tensor '{k}' is not a shard input of the graph" for k in sorted(set(params) - set(expected))[:3]]
    problems += [f"tensor '{k}' is missing (the graph would use its default for it)"
                 for k in sorted(set(expected) - set(params))[:3]]
    for key in sorted(set(params) & set(expected)):
        value = params[key]
        if list(value.shape()) != expected[key]:
            problems.append(f"tensor '{key}' has shape {list(value.shape())}, the graph takes {expected[key]}")
        elif (value.data_type() == "tensor(float16)") != (graph["dtype"] == "fp16"):
            problems.append(f"tensor '{key}' is {value.data_type()}, the graph's shards are {graph['dtype']}")
        elif not bool(np.isfinite(value.numpy()).all()):
            problems.append(f"tensor '{key}' contains NaN or Inf")
    if problems:
        return problems[:6]
    if fmt.get_model_version() != geometry_fingerprint(graph):
        return [f"made for another geometry than the graph's ({_describe(graph)}): the rotation, strides or "
                f"sharing rates differ (fingerprint {fmt.get_model_version()}, the graph's is "
                f"{geometry_fingerprint(graph)})"]
    scaling = version_scaling(fmt.get_adapter_version())
    if scaling != graph["scaling"]:
        return [f"its scaling γ = lora_alpha / r is {scaling:g} but the graph's nodes compute with "
                f"{graph['scaling']:g}: write the file with `prolora-export onnx-adapter --graph GRAPH` to fold "
                "the difference into its B shards"]
    return []


def check_adapter_fits(adapter, graph) -> dict:
    """Refuse, with one line saying what differs, an adapter that does not fit a compact graph.

    ``adapter``: an ``.onnx_adapter`` file (path or ``onnxruntime.AdapterFormat``), or a PRoLoRA
    :class:`~..formats.prolora.Adapter` or config (whose values a caller is about to feed). ``graph``:
    anything :func:`read_record` takes. Call it wherever a file is applied; returns the graph's record.
    """
    import onnxruntime as ort

    record = read_record(graph)
    config = getattr(adapter, "config", adapter)
    if hasattr(config, "module_geometry"):
        mine = geometry_record(config, record["dtype"])
        problems = _geometry_problems(mine, record)
        if not problems and mine["scaling"] != record["scaling"]:
            problems.append(f"scaling γ = lora_alpha / r is {mine['scaling']:g} here but {record['scaling']:g} in the "
                            "graph's nodes")
        raise_if(problems, "adapter does not fit the graph")
        return record
    where = None
    if not isinstance(adapter, ort.AdapterFormat):
        where = str(adapter)
        if not Path(adapter).is_file():
            raise PRoLoRAError("ONNX Runtime adapter file not found", where)
        try:
            adapter = ort.AdapterFormat.read_adapter(where)
        except Exception as err:  # ORT raises its own types for a damaged file
            raise PRoLoRAError(f"not an ONNX Runtime adapter file ({str(err).strip()[:200]})", where) from None
    problems = _file_problems(adapter, record)
    if problems:
        raise PRoLoRAError(problems, f"{where or 'adapter file'}: does not fit the graph")
    return record


def check_exported_from(adapter, graph) -> dict | None:
    """For a check of a graph against the adapter it should hold (parity): a compact graph must have
    this adapter's geometry and γ baked in and its values as the shards' defaults. Returns the record,
    or None for a graph that records none (merged exports: nothing baked in to check)."""
    try:
        record = read_record(graph)
    except PRoLoRAError:
        return None
    if record.get("defaults") == "zero":
        raise PRoLoRAError(
            "the graph's shards default to zero (exported with --default-adapter zero): with no ONNX Runtime "
            "adapter active it computes the base model, not base + adapter; check an export with "
            "--default-adapter adapter (the same graph with this adapter's values)",
            str(graph) if isinstance(graph, (str, Path)) else None,
        )
    if record.get("defaults") not in (None, "adapter"):
        raise PRoLoRAError(f"the graph's shards have no defaults ({record['defaults']} graph): it needs its "
                           "adapters fed at run time", str(graph) if isinstance(graph, (str, Path)) else None)
    return check_adapter_fits(adapter, record)


def fitted_arrays(adapter, record: dict, dtype: np.dtype) -> dict[str, np.ndarray]:
    """The adapter's tensors for a graph with ``record``: its geometry must fit (refused otherwise),
    and a γ different from the graph's is folded into the B shards (ΔW is linear in B), computed in
    float64 and cast once, so the graph's nodes compute this adapter's ΔW."""
    mine = geometry_record(adapter.config, record["dtype"])
    raise_if(_geometry_problems(mine, record), "adapter does not fit the graph")
    if _float32(adapter.config.scaling) == record["scaling"]:
        ratio = 1.0
    elif record["scaling"] == 0:
        raise PRoLoRAError("the graph's nodes compute with γ = 0 (lora_alpha 0): no adapter with another γ can be "
                           "folded into it")
    else:
        ratio = adapter.config.scaling / record["scaling"]
    arrays = {}
    problems = []
    for key, tensor in adapter.tensors.items():
        value = tensor.detach().double().numpy()
        if "_B_" in key and ratio != 1.0:
            value = value * ratio
        with np.errstate(over="ignore"):  # an overflow is reported below, in one line, not as a RuntimeWarning
            arrays[key] = np.ascontiguousarray(value.astype(dtype))
        if not np.isfinite(arrays[key]).all():  # the cast (fp16) or the folded γ overflowed
            folded = f" once γ is folded in (×{ratio:.4g})" if ratio != 1.0 else ""
            problems.append(f"tensor '{key}' has values up to {np.abs(value).max():.4g}, beyond the range of "
                            f"{np.dtype(dtype).name}{folded}")
    raise_if(problems[:3])
    return arrays
