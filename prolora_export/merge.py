"""Merge PRoLoRA adapters into a base model's weights, one safetensors shard at a time.

``W' = W + Σ_k w_k·ΔW_k`` with ``ΔW_k = γ_k·B_k·A_k`` (SPEC §1), computed in fp32 from the full
factors that :mod:`prolora_export.shards` reconstructs, and cast back once. The model is never
loaded, nor is any tensor held whole: untouched tensors are copied file to file by the kernel,
adapted ones are read, merged and written in cache-sized row blocks. Peak memory is the adapters
plus a few MiB, whatever the model, shard or tensor size, and the time is close to that of
copying the files. Everything that can be checked (module paths, shapes, dtypes, tied weights,
destination, disk space) is checked before the first byte is written, and every problem is
reported at once.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import PRoLoRAError, raise_if
from .formats.detect import read_adapter
from .formats.prolora import MAX_DELTA, Adapter, factor_maxima
from .formats.reference import ReadOptions
from .models import check_model_dir, copy_model_side_files, meta_model, resolve_model
from .outputs import atomic_output_dir, check_destination, check_free_space

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: --dtype choices -> torch dtype (None = keep each tensor's source dtype)
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
#: safetensors header dtype names of the floating types we merge into
SAFETENSORS_FLOATS: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

_LLAMA_LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_NEOX_LINEARS = frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"})
#: model_type -> (the class config.json's ``architectures`` must name, the names of its blocks' adaptable
#: layers, whether those are transformers' Conv1D, which stores W as (d_in, d_out)). In these models no
#: such layer shares its weight with another module, so with the checkpoint's own tensor shapes the
#: merge's layout needs no modeling code: importing transformers and building the model on the meta
#: device was most of a small merge's start-up. Anything else (lm_head, which may be tied; other names,
#: types or classes; remote code; quantized checkpoints) is decided on the model, as before.
#: tests/test_merge.py checks every entry against that model-based answer.
KNOWN_LAYOUTS: dict[str, tuple[str, frozenset[str], bool]] = {
    "llama": ("LlamaForCausalLM", _LLAMA_LINEARS, False),
    "mistral": ("MistralForCausalLM", _LLAMA_LINEARS, False),
    "qwen2": ("Qwen2ForCausalLM", _LLAMA_LINEARS, False),
    "qwen3": ("Qwen3ForCausalLM", _LLAMA_LINEARS, False),
    "gemma": ("GemmaForCausalLM", _LLAMA_LINEARS, False),
    "gemma2": ("Gemma2ForCausalLM", _LLAMA_LINEARS, False),
    "phi3": ("Phi3ForCausalLM", frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}), False),
    "opt": ("OPTForCausalLM", frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}), False),
    "gptj": ("GPTJForCausalLM", frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"}), False),
    "gpt_neox": ("GPTNeoXForCausalLM", _NEOX_LINEARS, False),
    "falcon": ("FalconForCausalLM", _NEOX_LINEARS, False),
    "bloom": ("BloomForCausalLM", _NEOX_LINEARS, False),
    "gpt2": ("GPT2LMHeadModel", frozenset({"c_attn", "c_proj", "c_fc"}), True),
}


@dataclass
class MergeReport:
    """What a merge did: where, how much, how exact, how long."""

    out: Path
    shards: int
    tensors_merged: int
    tensors_written: int
    #: max |cast(W + ΔW) − (W + ΔW)_fp32| over merged tensors (0 when the output is fp32)
    max_rounding_error: float
    seconds: float
    bytes_written: int
    dtype: str
    adapters: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class _TensorInfo:
    shard: str
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]


@dataclass
class _Plan:
    """The checked merge: which shards, which tensors get which delta, transposed or not."""

    base: Path
    shard_names: list[str]
    tensors: dict[str, _TensorInfo]
    #: "<P>.weight" -> True when stored (d_in, d_out) (Conv1D), False for (d_out, d_in)
    targets: dict[str, bool]
    index: dict | None


def _local_base(base: str | Path) -> Path:
    """A local model folder for ``base`` (alias, folder, or a hub id already in the HF cache)."""
    resolved = resolve_model(str(base))
    path = Path(resolved)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        path = Path(snapshot_download(resolved, allow_patterns=patterns))
    except Exception as err:  # any hub failure is a user-facing "cannot get it"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PRoLoRAError(f"not a local model folder and cannot be fetched from the hub: {first}", str(base)) from None
    check_model_dir(path)
    return path


def _read_layout(base: Path) -> tuple[list[str], dict[str, _TensorInfo], dict | None, list[str]]:
    """Shard file names, every tensor's shard/dtype/shape from the headers (no data read), the index."""
    problems: list[str] = []
    index = None
    if (base / INDEX_NAME).is_file():
        try:
            index = json.loads((base / INDEX_NAME).read_text())
            shard_names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
            raise PRoLoRAError(f"malformed shard index ({err})", str(base / INDEX_NAME)) from None
    elif (base / SINGLE_NAME).is_file():
        shard_names = [SINGLE_NAME]
    else:
        shard_names = sorted(p.name for p in base.glob("*.safetensors"))
    # the index is input: a name like "../x" would make the merge read and WRITE outside its folders
    unsafe = [n for n in shard_names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
    if unsafe:
        raise PRoLoRAError(f"shard names must be plain file names, got {unsafe[:3]}", str(base / INDEX_NAME))
    tensors: dict[str, _TensorInfo] = {}
    seen: dict[str, list[str]] = {}
    for name in shard_names:
        try:
            with safe_open(str(base / name), framework="pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    tensors[key] = _TensorInfo(name, piece.get_dtype(), tuple(piece.get_shape()))
                    seen.setdefault(key, []).append(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            problems.append(f"shard '{name}' is not a readable safetensors file ({err})")
    problems += [f"tensor '{k}' is stored in several shards ({', '.join(v)})" for k, v in seen.items() if len(v) > 1]
    if index is not None:
        missing = sorted(set(index["weight_map"]) - set(tensors))
        problems += [f"the index lists '{k}' but no shard holds it" for k in missing[:5]]
    return shard_names, tensors, index, problems


def _module_problems(
    adapter_dir: str, adapter: Adapter, tensors: dict[str, _TensorInfo], model: torch.nn.Module
) -> tuple[dict[str, bool], list[str]]:
    """Check every module of one adapter against the base's layers (``model``, on the meta device)
    and tensors; say which weights are stored transposed.

    Orientation comes from what the layer is (transformers' Conv1D stores (d_in, d_out)), never from
    the weight's shape: a square weight fits both, and an adapter whose recorded sizes are swapped
    would fit the transpose. Sizes that contradict the layer are refused, naming it.
    """
    from .inject import layer_problems, shared_weight_problems
    from .layer import stores_transposed

    targets: dict[str, bool] = {}
    problems: list[str] = []
    where = f"adapter {adapter_dir}"
    for path, shape in adapter.config.modules.items():
        bad = layer_problems(model, {path: shape}) or shared_weight_problems(model, [path])
        if bad:
            problems += [f"{where}: {p}" for p in bad]
            continue
        module = model.get_submodule(path)
        key, stored = f"{path}.weight", tuple(module.weight.shape)
        info = tensors.get(key)
        if info is None:
            problems.append(f"{where}: module '{path}': the base model has no tensor '{key}'")
        elif info.dtype not in SAFETENSORS_FLOATS:
            problems.append(f"{where}: module '{path}': base weight has dtype {info.dtype}, expected a floating type")
        elif info.shape != stored:
            problems.append(
                f"{where}: module '{path}': base weight '{key}' has shape {list(info.shape)}, but this "
                f"{type(module).__name__} layer stores {list(stored)} (a checkpoint that does not match its config?)"
            )
        else:
            targets[key] = stores_transposed(module)
    return targets, problems


def _checkpoint_targets(
    base: Path, loaded: list[tuple[str, Adapter, float]], tensors: dict[str, _TensorInfo]
) -> dict[str, bool] | None:
    """What :func:`_module_problems` finds (every adapted weight and whether it is stored transposed),
    from config.json and the checkpoint's headers alone, for the architectures of :data:`KNOWN_LAYOUTS`;
    None unless every module is one of their blocks' layers with a checkpoint weight of the adapter's
    sizes (the model-based checks then decide, and say what is wrong)."""
    try:
        config = json.loads((base / "config.json").read_text())
    except (OSError, ValueError):
        return None
    known = KNOWN_LAYOUTS.get(config.get("model_type")) if isinstance(config, dict) else None
    if known is None or config.get("architectures") != [known[0]] or {"auto_map", "quantization_config"} & set(config):
        return None
    _, layers, transposed = known
    targets: dict[str, bool] = {}
    for _, adapter, _ in loaded:
        for path, sizes in adapter.config.modules.items():
            info = tensors.get(f"{path}.weight")
            d_in, d_out = sizes["in_features"], sizes["out_features"]
            if (
                path.rpartition(".")[2] not in layers
                or info is None
                or info.dtype not in SAFETENSORS_FLOATS
                or info.shape != ((d_in, d_out) if transposed else (d_out, d_in))
            ):
                return None
            targets[f"{path}.weight"] = transposed
    return targets


def _delta_bound_problems(loaded: list[tuple[str, Adapter, float]]) -> list[str]:
    """Σ_k w_k·γ_k·B_k·A_k must stay in float32 range where it is computed: each adapter's file was
    checked alone (:mod:`.formats.prolora`), but a large --weight (1e30 is finite) can still make ΔW,
    and so the merged weight, inf. Bound: Σ_k max(1, |w_k·γ_k|)·r_k·max|B_k|·max|A_k|."""
    bounds: dict[str, float] = {}
    for _, adapter, weight in loaded:
        config = adapter.config
        for path in config.modules:
            a_max, b_max = factor_maxima(adapter.tensors, path)
            bound = max(1.0, abs(weight * config.scaling)) * config.r * a_max * b_max
            bounds[path] = bounds.get(path, 0.0) + bound
    return [
        f"module '{path}': Σ w·γ·B·A may reach {bound:.3g}, beyond float32 range (the --weight values times the "
        "adapters' scaling are too large)"
        for path, bound in sorted(bounds.items())
        if not bound <= MAX_DELTA
    ]


def _is_finite_number(value) -> bool:
    """A real number that is not nan or ±inf (a NaN weight would write NaN weights with exit 0)."""
    if isinstance(value, (bool, str)):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _plan(
    base: str | Path,
    adapters: Sequence[tuple[str | Path, float]],
    out: Path,
    force: bool,
    read_options: ReadOptions | None = None,
):
    """Load and check everything; return the plan and the loaded adapters, or raise with ALL problems.

    Adapters are read by the one reader (any layout, reference checkpoints included)."""
    from .convert import base_sizes

    problems: list[str] = []
    base_dir: Path | None = None
    try:
        base_dir = _local_base(base)
    except PRoLoRAError as err:
        problems += err.problems
    if not adapters:
        problems.append("no adapter given (pass at least one --adapter)")
    loaded: list[tuple[str, Adapter, float]] = []
    for adapter_dir, weight in adapters:
        if not _is_finite_number(weight):
            problems.append(f"adapter {adapter_dir}: the weight must be a finite number, got {weight!r}")
            continue
        try:
            sizes = base_sizes(str(base_dir)) if base_dir is not None else None
            loaded.append((str(adapter_dir), read_adapter(adapter_dir, read_options, sizes).adapter, float(weight)))
        except PRoLoRAError as err:
            problems += err.problems
    try:
        inputs = [("base model folder", base_dir), *(("adapter folder", a) for a, _ in adapters)]
        check_destination(out, force, inputs=inputs)
    except PRoLoRAError as err:
        problems += err.problems
    if base_dir is None:
        raise_if(problems)
    shard_names, tensors, index, layout_problems = _read_layout(base_dir)
    problems += layout_problems
    problems += _delta_bound_problems(loaded)
    targets = _checkpoint_targets(base_dir, loaded, tensors)
    if targets is None:
        targets = {}
        try:
            model = meta_model(str(base_dir), checkpoint_layout=True)
        except PRoLoRAError as err:
            problems += err.problems
        else:
            for adapter_dir, adapter, _ in loaded:
                found, bad = _module_problems(adapter_dir, adapter, tensors, model)
                targets.update(found)
                problems += bad
    raise_if(problems)
    return _Plan(base_dir, shard_names, tensors, targets, index), loaded


def _out_dtype(info: _TensorInfo, target: torch.dtype | None) -> torch.dtype | None:
    """Output dtype of a floating tensor under --dtype; None for non-floating tensors (copied as is)."""
    source = SAFETENSORS_FLOATS.get(info.dtype)
    if source is None:
        return None
    return target or source


#: bytes per element of every safetensors dtype name (floats included)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2}


def _output_size(plan: _Plan, target: torch.dtype | None) -> int:
    """Bytes of all output shards (headers aside), to check disk space and rewrite the index."""
    total = 0
    for info in plan.tensors.values():
        dtype = _out_dtype(info, target)
        itemsize = dtype.itemsize if dtype is not None else ITEMSIZE.get(info.dtype, 1)
        total += itemsize * math.prod(info.shape)
    return total


#: elements per row block of a merged tensor: the source block, its fp32 copy and the cast output
#: (a few MiB together) stay in a core's cache, so each byte crosses main memory about once each way
BLOCK_ELEMENTS = 1 << 18
#: tensors written at once (each thread: a few MiB of blocks and one staging buffer)
WORKERS = 2
#: errno values meaning "copy_file_range cannot do this copy" (not a real I/O error)
NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
#: bytes per write (and per plain copy or cast chunk): small writes cost several times more per byte
STAGE_BYTES = 16 << 20
_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _update_factors(
    plan: _Plan, key: str, loaded: list[tuple[str, Adapter, float]], exact_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with ``W += L @ R`` equal to ``W + Σ_k w_k·γ_k·B_k·A_k`` in W's storage orientation.

    Several adapters become one matmul of rank Σ r_k (their factors side by side). Conv1D weights
    are stored (d_in, d_out), so there ``L = Aᵀ`` and ``R = Bᵀ``.
    """
    path = key[: -len(".weight")]
    lefts, rights = [], []
    for _, adapter, weight in loaded:
        if path in adapter.config.modules:
            b, a = adapter.factors(path, exact_dtype)
            lefts.append(b * (adapter.config.scaling * weight))
            rights.append(a)
    left, right = torch.cat(lefts, dim=1), torch.cat(rights, dim=0)
    if plan.targets[key]:
        return right.t().contiguous(), left.t().contiguous()
    return left, right


def _data_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Where the data section starts and each tensor's [begin, end) in it (header already checked by
    :func:`_read_layout` through safetensors)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    return 8 + length, {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}


def _read_into(fd: int, buffer: torch.Tensor, offset: int, path: Path) -> torch.Tensor:
    """Fill ``buffer`` from ``fd`` at ``offset`` (a plain read from the page cache: no page faults)."""
    view = _raw(buffer)
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise PRoLoRAError("the shard is shorter than its header says (truncated?)", str(path))
        done += count
    return buffer


def _raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, without a copy (numpy has no bf16, hence the uint8 view)."""
    return memoryview(tensor.view(torch.uint8).numpy())


class _Cursor:
    """Writes one tensor's bytes into the output file from a known offset on (``pwrite``), so
    tensors can be written in any order and from several threads at once."""

    def __init__(self, fd: int, offset: int):
        self.fd, self.offset = fd, offset

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            count = os.pwrite(self.fd, view, self.offset)
            self.offset += count
            view = view[count:]

    def copy(self, src: int, offset: int, count: int, path: Path) -> None:
        """``count`` bytes of ``src`` from ``offset``: in the kernel (copy_file_range, no user-space
        pass) where the file systems allow it, else through a buffer."""
        end = offset + count
        try:
            while offset < end:
                copied = os.copy_file_range(src, self.fd, end - offset, offset, self.offset)
                if copied == 0:
                    raise PRoLoRAError("the shard is shorter than its header says (truncated?)", str(path))
                offset += copied
                self.offset += copied
            return
        except (AttributeError, OSError) as err:  # no copy_file_range here, or not across these file systems
            if isinstance(err, OSError) and err.errno not in NO_KERNEL_COPY:
                raise
        buffer = torch.empty(min(STAGE_BYTES, end - offset), dtype=torch.uint8)
        while offset < end:
            chunk = buffer[: min(STAGE_BYTES, end - offset)]
            self.write(_raw(_read_into(src, chunk, offset, path)))
            offset += chunk.numel()


class _Overflow(Exception):
    """A finite value became ±inf in the output dtype (its magnitude in ``args[0]``)."""


def _check_range(exact: torch.Tensor, cast: torch.Tensor) -> None:
    """Raise :class:`_Overflow` where a finite ``exact`` value is not finite once ``cast``: a cast to a
    narrower range (fp32 → fp16) turns such values into inf silently. Non-finite inputs stay as they are."""
    if not bool(torch.isfinite(cast).all()):
        lost = torch.isfinite(exact) & ~torch.isfinite(cast)
        if bool(lost.any()):
            raise _Overflow(float(exact[lost].abs().max()))


def _cast_range(
    src: int, out: _Cursor, offset: int, numel: int, dtypes: tuple[torch.dtype, torch.dtype], path: Path
) -> None:
    """``numel`` elements read at ``offset`` as ``dtypes[0]``, written as ``dtypes[1]``, chunk by chunk
    (:class:`_Overflow` when a value does not fit the output dtype)."""
    source = torch.empty(min(STAGE_BYTES // dtypes[0].itemsize, numel), dtype=dtypes[0])
    cast = torch.empty_like(source, dtype=dtypes[1])
    narrows = torch.finfo(dtypes[1]).max < torch.finfo(dtypes[0]).max
    for start in range(0, numel, source.numel()):
        count = min(source.numel(), numel - start)
        block = _read_into(src, source[:count], offset + start * dtypes[0].itemsize, path)
        cast[:count].copy_(block)
        if narrows:
            _check_range(block, cast[:count])
        out.write(_raw(cast[:count]))


def _merge_weight(
    src: int,
    out: _Cursor,
    offset: int,
    shape: tuple[int, int],
    dtypes: tuple[torch.dtype, torch.dtype],
    factors: tuple[torch.Tensor, torch.Tensor],
    path: Path,
) -> float:
    """``cast(W + L @ R)`` for W read at ``offset``; return the largest rounding error of the cast
    (:class:`_Overflow` when a merged value does not fit the output dtype).

    Computed in row blocks that fit in cache, in the factors' dtype (fp32, or fp64 for fp64 weights),
    with in-place same-dtype ops only (mixed-dtype ones are several times slower on CPU); results are
    gathered into ``STAGE_BYTES`` writes (small writes cost several times more per byte).
    """
    rows, cols = shape
    (source_dtype, out_dtype), (left, right) = dtypes, factors
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    per_write = max(step, STAGE_BYTES // max(cols * out_dtype.itemsize, 1) // step * step)
    staged = torch.empty(min(per_write, rows), cols, dtype=out_dtype)
    source = torch.empty(min(step, rows), cols, dtype=source_dtype)
    exact = cast_back = None
    narrows = torch.finfo(out_dtype).max < torch.finfo(left.dtype).max
    if out_dtype != left.dtype:
        exact, cast_back = torch.empty_like(source, dtype=left.dtype), torch.empty_like(source, dtype=left.dtype)
    error = 0.0
    for first in range(0, rows, per_write):
        last = min(first + per_write, rows)
        for row in range(first, last, step):
            count = min(step, last - row)
            block = _read_into(src, source[:count], offset + row * cols * source_dtype.itemsize, path)
            target = staged[row - first : row - first + count]
            if exact is None:  # the output dtype is the exact one: merge right in the staging buffer
                target.copy_(block).addmm_(left[row : row + count], right)
                _check_range(block, target)  # W finite, W + ΔW not: refused, never written
                continue
            merged = exact[:count].copy_(block).addmm_(left[row : row + count], right)
            target.copy_(merged)
            if narrows:
                _check_range(merged, target)
            diff = merged.sub_(cast_back[:count].copy_(target)).abs_()
            block_error = float(diff.max())
            if math.isnan(block_error):  # inf in W itself, kept as inf: not a rounding error
                block_error = float(torch.nan_to_num(diff, nan=0.0).max())
            error = max(error, block_error)
        out.write(_raw(staged[: last - first]))
    return error


def _header(layout: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """A safetensors header (8-byte length + JSON) for tensors stored back to back in ``layout``
    order, and where each tensor starts in the file."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, (dtype, shape) in layout.items():
        size = ITEMSIZE.get(dtype, 1) * math.prod(shape)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data section like safetensors does
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {k: start + header[k]["data_offsets"][0] for k in layout}


def _merge_shard(
    plan: _Plan,
    name: str,
    loaded: list[tuple[str, Adapter, float]],
    target: torch.dtype | None,
    dest: Path,
    bar,
) -> tuple[int, float]:
    """Write one output shard; return (tensors merged, max rounding error).

    Nothing is memory-mapped or held whole: untouched tensors are copied file to file by the
    kernel, cast and merged ones pass through a few MiB of row blocks. Memory stays at the
    adapters plus those blocks, whatever the tensor, shard or model size. Every tensor's place
    in the output is known from the header, so ``WORKERS`` threads write tensors side by side
    (reads, writes and torch kernels all release the GIL).
    """
    source_path = plan.base / name
    keys = sorted(k for k, info in plan.tensors.items() if info.shard == name)
    out_dtypes = {k: _out_dtype(plan.tensors[k], target) for k in keys}
    layout = {k: (_ST_NAMES.get(out_dtypes[k], plan.tensors[k].dtype), plan.tensors[k].shape) for k in keys}
    header, out_offsets = _header(layout, {"format": "pt"})
    data_start, offsets = _data_offsets(source_path)

    def write_tensor(key: str) -> float:
        try:
            return write(key)
        except _Overflow as err:
            raise PRoLoRAError(
                f"tensor '{key}' has values up to {err.args[0]:.4g}, beyond the range of {out_dtypes[key]} "
                f"(max {torch.finfo(out_dtypes[key]).max:.4g}): they would be written as inf; keep --dtype auto or "
                "use fp32 or bf16",
                str(source_path),
            ) from None

    def write(key: str) -> float:
        info, out_dtype = plan.tensors[key], out_dtypes[key]
        source_dtype = SAFETENSORS_FLOATS.get(info.dtype)
        begin, end = offsets[key]
        cursor = _Cursor(out.fileno(), out_offsets[key])
        if key in plan.targets:
            exact_dtype = torch.float64 if source_dtype == torch.float64 else torch.float32
            factors = _update_factors(plan, key, loaded, exact_dtype)
            shape = (info.shape[0], math.prod(info.shape[1:]))
            return _merge_weight(
                src, cursor, data_start + begin, shape, (source_dtype, out_dtype), factors, source_path
            )
        if out_dtype is None or out_dtype == source_dtype:
            cursor.copy(src, data_start + begin, end - begin, source_path)
        else:
            _cast_range(src, cursor, data_start + begin, math.prod(info.shape), (source_dtype, out_dtype), source_path)
        return 0.0

    merged, max_err = 0, 0.0
    src = os.open(source_path, os.O_RDONLY)
    try:
        with open(dest / name, "wb", buffering=0) as out, ThreadPoolExecutor(WORKERS) as pool:
            _Cursor(out.fileno(), 0).write(header)
            for key, error in zip(keys, pool.map(write_tensor, keys), strict=True):
                merged += key in plan.targets
                max_err = max(max_err, error)
                bar.update(1)
    finally:
        os.close(src)
    return merged, max_err


def _write_config(base: Path, dest: Path, target: torch.dtype | None) -> None:
    """config.json with the new dtype when --dtype changed it (copied unchanged otherwise)."""
    if target is None or not (base / "config.json").is_file():
        return
    config = json.loads((base / "config.json").read_text())
    config["torch_dtype"] = TORCH_DTYPE_NAMES[target]
    if "dtype" in config:
        config["dtype"] = TORCH_DTYPE_NAMES[target]
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge_adapters(
    base: str | Path,
    adapters: Sequence[tuple[str | Path, float]],
    out: str | Path,
    dtype: str = "auto",
    force: bool = False,
    progress: bool = True,
    read_options: ReadOptions | None = None,
) -> MergeReport:
    """Write ``out``: a drop-in copy of ``base`` with ``W + Σ_k w_k·γ_k·B_k·A_k`` in every adapted layer.

    ``adapters`` is a list of (adapter folder, weight). ``dtype`` is auto (keep each tensor's
    dtype), fp32, fp16 or bf16 (converts every floating tensor). Shard names, the index,
    config, tokenizer and other side files are kept; tied weights stay as the base stores them.
    ``read_options``: what the user states about reference checkpoints and whether pickle may be read.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    if dtype not in DTYPES:
        raise PRoLoRAError(f"unknown dtype '{dtype}' (expected one of: {', '.join(DTYPES)})")
    target = DTYPES[dtype]
    out = Path(out)
    plan, loaded = _plan(base, adapters, out, force, read_options)
    total_size = _output_size(plan, target)
    check_free_space(out.absolute(), total_size + (64 << 20))

    merged, max_err, written = 0, 0.0, 0
    with atomic_output_dir(out, force=force) as tmp:
        with tqdm(total=len(plan.tensors), desc="merge tensors", unit="t", disable=not progress, position=1) as tbar:
            for name in tqdm(plan.shard_names, desc="shards", unit="shard", disable=not progress, position=0):
                count, err = _merge_shard(plan, name, loaded, target, tmp, tbar)
                merged += count
                max_err = max(max_err, err)
                written += (tmp / name).stat().st_size
        copy_model_side_files(plan.base, tmp)
        _write_config(plan.base, tmp, target)
        if plan.index is not None:
            index = dict(plan.index)
            index["metadata"] = {**(index.get("metadata") or {}), "total_size": total_size}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return MergeReport(
        out=out,
        shards=len(plan.shard_names),
        tensors_merged=merged,
        tensors_written=len(plan.tensors),
        max_rounding_error=max_err,
        seconds=time.perf_counter() - start,
        bytes_written=written,
        dtype=dtype,
        adapters=[(d, w) for d, _, w in loaded],
    )
