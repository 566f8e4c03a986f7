"""The reference implementation's checkpoints (SPEC §3), read exactly as its code writes them.

Its ``adapter_config.json`` is a plain PEFT ``LoraConfig``: none of m, n, u, the rotation
switch or the strides is saved. Two tensor layouts exist, both under PEFT key names:

* training layout (``checkpoint-N/``; the final folder's ``adapter_model.safetensors``):
  ``lora_A.weight`` = A₀ (r_s × c_A), ``lora_B.weight`` = B₀ (c_B × r_s), ``lora_A_vec`` = A_u
  (u × d_in), ``lora_B_vec`` = B_uᵀ (u × d_out); all four always written, zero-size when u = 0
  (the vectors) or u = r (the chunks). r_s, u, c_A, c_B and the layer sizes come from the
  shapes; m and n from the chunk widths; rotation and strides are the reference's defaults.
* expanded layout (the final ``adapter_model.bin``, a pickle): full A (r × W) and B (W × r),
  unshared ranks last, W cut at Llama-2-7B lengths, so possibly wider than the layer. u, m, n,
  the strides and the rotation are found by checking which chunk structure reproduces the
  tensors bit for bit (:mod:`..shards`). When several do, the one with the fewest parameters
  wins, then the smallest u, m, n; strides: the reference's defaults, then rotation off, then the
  smallest that fit (all exact: each candidate reproduces the same A and B). When none with
  m ≥ 2 or n ≥ 2 does, it is a genuine plain LoRA.

Values the user states (:class:`ReadOptions`, the ``train`` option names) are verified
against the tensors; a contradiction is refused. Every hyperparameter is reported with
where it came from (:class:`Inference`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import PRoLoRAConfig
from ..errors import PRoLoRAError, raise_if
from ..shards import (
    default_stride,
    first_unrotated_chunk,
    periodic_widths,
    rotation_mismatch,
    rotation_strides,
    split_shards,
)
from .peft_lora import A_SUFFIX, B_SUFFIX, LoraFactors, check_tensor, target_names
from .prolora import Adapter, tensor_problems

A_VEC = ".lora_A_vec"
B_VEC = ".lora_B_vec"
#: the hyperparameters a reader reports, in ``train``'s names
HYPERPARAMETERS = ("r", "unshared_r", "sharing_rate_a", "sharing_rate_b", "rotate", "stride_a", "stride_b")
#: where a value came from
FROM_FILES, INFERRED, FROM_OPTIONS, REFERENCE_DEFAULT = "files", "inferred", "option", "reference default"
OPTION_NAMES = {k: "--" + k.replace("_", "-") for k in HYPERPARAMETERS}

Shapes = dict[str, tuple[int, int]]


@dataclass
class ReadOptions:
    """What the user states about an adapter folder (all optional) and how its files may be read."""

    r: int | None = None
    unshared_r: int | None = None
    sharing_rate_a: int | None = None
    sharing_rate_b: int | None = None
    rotate: bool | None = None
    stride_a: int | None = None
    stride_b: int | None = None
    #: read ``adapter_model.bin`` through ``torch.load(weights_only=True)``
    allow_pickle: bool = False
    #: which file wins when both exist and disagree: "bin", "safetensors" or None (refuse)
    prefer: str | None = None

    def stated(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in HYPERPARAMETERS if getattr(self, k) is not None}


@dataclass
class Inference:
    """The hyperparameters as read, each with its source (files, inferred, option, reference default)."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def set(self, key: str, value: Any, source: str) -> None:
        self.values[key], self.sources[key] = value, source

    def summary(self) -> str:
        """One line: ``r=8 (files), sharing_rate_a=2 (inferred), …`` then the notes."""
        parts = [f"{k}={self.values[k]} ({self.sources[k]})" for k in HYPERPARAMETERS if k in self.values]
        return "; ".join([", ".join(parts), *self.notes])


def _contradiction(key: str, stated: Any, found: Any, why: str) -> PRoLoRAError:
    return PRoLoRAError(f"{OPTION_NAMES[key]} {_shown(stated)} contradicts the tensors: {why} (they say {found})")


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _stride_value(stride: int | None, shared_r: int) -> int | None:
    """A stride as the reference writes it (any integer) reduced modulo r_s; None without a shared rank."""
    return None if stride is None or shared_r == 0 else stride % shared_r


def _rates(size: int, chunk: int) -> range:
    """The sharing rates m with ``ceil(size / m) == chunk`` (several when the last chunks are empty)."""
    if chunk <= 0 or chunk > size:
        return range(0)
    low = -(-size // chunk)
    high = size if chunk == 1 else -(-size // (chunk - 1)) - 1
    return range(low, max(high, low) + 1)


def _config(
    data: dict[str, Any],
    r: int,
    u: int,
    m: int,
    n: int,
    rotate: bool,
    strides: tuple[int | None, int | None],
    sizes: Shapes,
) -> PRoLoRAConfig:
    """Our config for a reference folder; strides equal to the default are stored as null."""
    shared_r = r - u
    defaults = (default_stride(shared_r, m) % max(shared_r, 1), default_stride(shared_r, n) % max(shared_r, 1))
    stride_a, stride_b = (None if s is None or s == d else s for s, d in zip(strides, defaults, strict=True))
    extra = {k: data[k] for k in ("task_type",) if data.get(k)}
    return PRoLoRAConfig(
        r=r,
        unshared_r=u,
        sharing_rate_a=m,
        sharing_rate_b=n,
        rotate=rotate,
        stride_a=stride_a if rotate else None,
        stride_b=stride_b if rotate else None,
        lora_alpha=data["lora_alpha"],
        lora_dropout=float(data.get("lora_dropout") or 0.0),
        target_modules=target_names(list(sizes)),
        base_model_name_or_path=data.get("base_model_name_or_path"),
        modules={p: {"in_features": i, "out_features": o} for p, (i, o) in sizes.items()},
        extra=extra,
    )


# --------------------------------------------------------------------------- training layout
def is_training_layout(keys: list[str]) -> bool:
    return any(k.endswith((A_VEC, B_VEC)) for k in keys)


def read_training(
    tensors: dict[str, torch.Tensor], data: dict[str, Any], options: ReadOptions, sizes: Shapes | None, where: str
) -> tuple[Adapter, Inference]:
    """The training layout → our Adapter (renaming and one transpose: exact), hyperparameters inferred."""
    suffixes = (A_SUFFIX, B_SUFFIX, A_VEC, B_VEC)
    problems = [f"unexpected tensor '{k}'" for k in tensors if not k.endswith(suffixes)]
    paths = sorted({k[: -len(s)] for k in tensors for s in suffixes if k.endswith(s)})
    # the reference writes all four for every layer, zero-size ones included
    problems += [f"missing tensor '{p}{s}'" for p in paths for s in suffixes if p + s not in tensors]
    for key, tensor in tensors.items():
        problems += (
            [f"tensor '{key}' must be a matrix, got shape {list(tensor.shape)}"]
            if tensor.dim() != 2
            else check_tensor(key, tensor)
        )
    raise_if(problems or ([] if paths else ["no reference tensors (*.lora_A.weight, *.lora_A_vec …)"]), where)

    shared = {(tensors[p + A_SUFFIX].shape[0], tensors[p + B_SUFFIX].shape[1]) for p in paths}
    unshared = {(tensors[p + A_VEC].shape[0], tensors[p + B_VEC].shape[0]) for p in paths}
    if len(shared) != 1 or len(unshared) != 1 or len({*next(iter(shared))}) != 1 or len({*next(iter(unshared))}) != 1:
        raise PRoLoRAError(
            "the layers disagree on the shared rank (rows of lora_A.weight, columns of lora_B.weight) or the "
            "unshared rank (rows of lora_A_vec / lora_B_vec): one adapter has one r and one unshared_r",
            where,
        )
    shared_r, u = next(iter(shared))[0], next(iter(unshared))[0]
    r = shared_r + u
    info = Inference()
    info.set("r", r, FROM_FILES)
    info.set("unshared_r", u, FROM_FILES)
    if r != data["r"]:
        raise PRoLoRAError(
            f"adapter_config.json says r = {data['r']} but the tensors have r_s + u = {shared_r} + {u} = {r}", where
        )
    for key, found in (("r", r), ("unshared_r", u)):
        if key in options.stated() and options.stated()[key] != found:
            raise _contradiction(key, options.stated()[key], found, "lora_A.weight and lora_A_vec have these ranks")

    layer_sizes = _training_sizes(tensors, paths, sizes, where)
    info.notes.append("layer sizes from the lora_A_vec / lora_B_vec shapes")
    rates = []
    for key, suffix, dim, side in (("sharing_rate_a", A_SUFFIX, 1, 0), ("sharing_rate_b", B_SUFFIX, 0, 1)):
        rates.append(_training_rate(key, {p: (layer_sizes[p][side], tensors[p + suffix].shape[dim]) for p in paths},
                                    shared_r, options, info, where))
    m, n = rates
    rotate, strides = _training_rotation(shared_r, m, n, options, info)
    config = _config(data, r, u, m, n, rotate, strides, layer_sizes)

    ours: dict[str, torch.Tensor] = {}
    for path in paths:
        if shared_r > 0:
            ours[f"{path}.prolora_A_shard"] = tensors[path + A_SUFFIX]
            ours[f"{path}.prolora_B_shard"] = tensors[path + B_SUFFIX]
        if u > 0:
            ours[f"{path}.prolora_A_unshared"] = tensors[path + A_VEC]
            ours[f"{path}.prolora_B_unshared"] = tensors[path + B_VEC].t().contiguous()
    theirs = {"prolora_A_shard": A_SUFFIX, "prolora_B_shard": B_SUFFIX, "prolora_A_unshared": A_VEC,
              "prolora_B_unshared": B_VEC + " (transposed)"}
    problems = tensor_problems(config, ours)
    for name, suffix in theirs.items():
        problems = [p.replace(f".{name}'", f"{suffix}'") for p in problems]
    raise_if(problems, where)
    return Adapter(config, ours), info


def _training_sizes(tensors: dict[str, torch.Tensor], paths: list[str], sizes: Shapes | None, where: str) -> Shapes:
    """(d_in, d_out) per layer from the ``*_vec`` shapes (they carry them even when zero-size),
    checked against the base model's when known."""
    found = {p: (tensors[p + A_VEC].shape[1], tensors[p + B_VEC].shape[1]) for p in paths}
    problems = []
    for path, shape in found.items():
        if sizes is not None and path not in sizes:
            problems.append(f"module '{path}' does not exist in the base model (or is not a Linear layer)")
        elif sizes is not None and sizes[path] != shape:
            problems.append(
                f"module '{path}' is {sizes[path][0]}→{sizes[path][1]} in the base model but its lora_A_vec / "
                f"lora_B_vec say {shape[0]}→{shape[1]}"
            )
    raise_if(problems, where)
    return found


def _training_rate(
    key: str, widths: dict[str, tuple[int, int]], shared_r: int, options: ReadOptions, info: Inference, where: str
) -> int:
    """m (or n) from the chunk widths: the rates with ceil(size / rate) = chunk width in every layer."""
    side = "A" if key.endswith("_a") else "B"
    common: set[int] | None = None
    for path, (size, chunk) in widths.items():
        rates = _rates(size, chunk)
        common = set(rates) if common is None else common & set(rates)
        if not common:
            raise PRoLoRAError(
                f"module '{path}': a chunk of {side} {chunk} wide in a layer of {size} fits no {key} shared by the "
                f"other layers: not a PRoLoRA training checkpoint",
                where,
            )
    stated = options.stated().get(key)
    if stated is not None:
        if stated not in common:
            raise _contradiction(key, stated, f"{key} ∈ {_span(common)}", f"its chunks of {side} have these widths")
        info.set(key, stated, FROM_OPTIONS)
        return stated
    rate = min(common)
    info.set(key, rate, INFERRED)
    if len(common) > 1 and shared_r > 0:
        differ = len({default_stride(shared_r, k) % shared_r for k in common}) > 1
        info.notes.append(
            f"{key}: the chunk widths fit {_span(common)}; took the smallest, {rate}"
            + (f" (the others imply other default strides: state {OPTION_NAMES[key]} if it was one of them)"
               if differ else "")
        )
    return rate


def _span(values: set[int]) -> str:
    ordered = sorted(values)
    if len(ordered) > 3 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"[{ordered[0]}, {ordered[-1]}]"
    return "{" + ", ".join(map(str, ordered)) + "}"


def _training_rotation(
    shared_r: int, m: int, n: int, options: ReadOptions, info: Inference
) -> tuple[bool, tuple[int | None, int | None]]:
    """The reference's entry point asserts rotation on with its default strides; options may say otherwise
    (the shards alone cannot confirm either: any rotation is consistent with them)."""
    if options.rotate is not None:
        info.set("rotate", options.rotate, FROM_OPTIONS)
    else:
        info.set("rotate", True, REFERENCE_DEFAULT)
    strides = []
    for key, rate in (("stride_a", m), ("stride_b", n)):
        value = _stride_value(options.stated().get(key), shared_r)
        if value is not None:
            info.set(key, value, FROM_OPTIONS)
        elif shared_r > 0:
            info.set(key, default_stride(shared_r, rate) % shared_r, REFERENCE_DEFAULT)
        strides.append(value)
    if shared_r > 0 and m * n > 1:
        info.notes.append("rotation and strides are not verifiable from the training layout alone")
    return info.values["rotate"], (strides[0], strides[1])


# --------------------------------------------------------------------------- expanded layout
@dataclass
class _Side:
    """The candidates of one factor (A or B) for one u: rate -> strides (mod r_s) that every layer allows."""

    rates: dict[int, set[int]]
    #: the first layer index where the rates ≥ 2 all died, and the rate and chunk that broke there
    broken: tuple[int, int, int | None] | None = None


def _shared_part(factor: torch.Tensor, shared_r: int, side: str) -> torch.Tensor:
    """A's first r_s rows, or B's first r_s columns transposed: (r_s × W) either way."""
    return factor[:shared_r] if side == "A" else factor[:, :shared_r].t()


def _search_side(
    factors: list[tuple[str, torch.Tensor, int]], shared_r: int, side: str, stated: int | None
) -> _Side:
    """Which rates (and strides) reproduce this factor bitwise in every layer; ``factors`` holds
    (path, shared part (r_s × W), layer size) per layer. Rates go up to the smallest layer (a rate
    beyond a layer's size is no adapter); None as a rate's strides means "any stride so far"."""
    smallest_size = min(size for _, _, size in factors)
    candidates = [stated] if stated else list(range(2, smallest_size + 1))
    rates: dict[int, set[int] | None] = dict.fromkeys(candidates)
    result = _Side({})
    for index, (_, shared, size) in enumerate(factors):
        if not rates:
            break
        if not bool(shared.ne(0).any()) and not bool(torch.signbit(shared).any()):
            continue  # all +0.0: every structure reproduces it
        width = shared.shape[1]
        listed = torch.tensor(list(rates))
        chunks = -(-size // listed)
        fits = (chunks * listed >= width) | (width <= size)  # an over-wide tail must lie within m chunks
        by_chunk: dict[int, list[int]] = {}
        for chunk in sorted(set(chunks[fits].tolist())):
            by_chunk[chunk] = listed[fits & (chunks == chunk)].tolist()
        survivors: dict[int, set[int] | None] = {}
        for chunk in periodic_widths(shared, list(by_chunk)):
            strides = set(rotation_strides(shared, chunk))
            for rate in by_chunk[chunk]:
                kept = strides if rates[rate] is None else rates[rate] & strides
                if kept:
                    survivors[rate] = kept
        if not survivors:
            smallest = min(rates)
            result.broken = (index, smallest, first_unrotated_chunk(shared, -(-size // smallest)))
        rates = survivors
    result.rates = {rate: set(range(shared_r)) if strides is None else strides for rate, strides in rates.items()}
    return result


def _broken_text(side: str, key: str, broken: tuple[int, int, int | None] | None, paths: list[str]) -> str:
    if broken is None:
        return f"{side}: no {key} ≥ 2 fits"
    index, rate, chunk = broken
    what = (
        f"chunk {chunk} of {side} is not chunk 0 rotated by any stride"
        if chunk is not None
        else f"the chunks of {side} are rotations of chunk 0 but not by multiples of one stride"
    )
    return f"layer '{paths[index]}': {what} ({key} = {rate})"


def read_expanded(
    lora: LoraFactors,
    options: ReadOptions,
    sizes: Shapes | None,
    where: str,
    compact: bool,
    sizes_from: str = "--base",
    pickled: bool = False,
) -> tuple[Adapter, Inference, bool]:
    """Full factors → shards, with u, m, n, rotation and strides found from the tensors themselves.

    Returns (adapter, inference, structured). ``structured`` is False for a genuine plain LoRA
    (no m ≥ 2 or n ≥ 2 reproduces it): with ``compact`` that is refused, naming the first layer and
    chunk that breaks every candidate; without, it is read as plain LoRA (u = r), which is exact.
    """
    paths = sorted(lora.factors)
    r = lora.r
    stated = options.stated()
    info = Inference()
    info.set("r", r, FROM_FILES)
    if "r" in stated and stated["r"] != r:
        raise _contradiction("r", stated["r"], r, "lora_A.weight has this many rows")
    layer_sizes, over_wide = _expanded_sizes(lora, sizes, where, sizes_from, info)
    wider = {
        "A": any(lora.factors[p][0].shape[1] > layer_sizes[p][0] for p in paths),
        "B": any(lora.factors[p][1].shape[0] > layer_sizes[p][1] for p in paths),
    }

    u_candidates = [stated["unshared_r"]] if "unshared_r" in stated else list(range(r + 1))
    if over_wide and any(u > 0 for u in u_candidates):
        if "unshared_r" in stated and stated["unshared_r"] > 0:
            raise _contradiction("unshared_r", stated["unshared_r"], "u = 0", f"layer '{over_wide[0]}' is wider than "
                                 "the layer, which the reference only writes with no unshared rank")
        u_candidates = [0]
    best: tuple | None = None
    found: list[tuple] = []
    last_broken: tuple[int, str] | None = None
    for u in u_candidates:
        shared_r = r - u
        if shared_r == 0:
            continue
        sides = {}
        for side, key in (("A", "sharing_rate_a"), ("B", "sharing_rate_b")):
            parts = [
                (p, _shared_part(lora.factors[p][0 if side == "A" else 1], shared_r, side),
                 layer_sizes[p][0 if side == "A" else 1])
                for p in paths
            ]
            rate = stated.get(key)
            sides[side] = _search_side(parts, shared_r, side, rate if rate is None or rate >= 2 else None)
            if rate == 1:
                sides[side].rates = {}
        choices = {}
        for side, key in (("A", "sharing_rate_a"), ("B", "sharing_rate_b")):
            # one chunk is never wider than the layer: an over-wide factor needs a rate ≥ 2 that explains its tail
            one = [] if wider[side] else [1]
            choices[side] = [stated[key]] if key in stated else [*one, *sorted(sides[side].rates)]
            choices[side] = [k for k in choices[side] if k in one or k in sides[side].rates]
        for m in choices["A"]:
            for n in choices["B"]:
                if m == 1 and n == 1:
                    continue
                candidate = _candidate(u, m, n, sides, layer_sizes, r)
                found.append(candidate)
                if best is None or candidate[0] < best[0]:
                    best = candidate
        for side in ("A", "B"):
            if sides[side].broken and (last_broken is None or sides[side].broken[0] >= last_broken[0]):
                last_broken = (sides[side].broken[0], _broken_text(
                    side, "sharing_rate_a" if side == "A" else "sharing_rate_b", sides[side].broken, paths
                ) + (f" (unshared_r = {u})" if u else ""))

    if best is None:
        return _plain(lora, options, info, layer_sizes, where, compact, last_broken, stated)
    if pickled and sizes is None and best[1] == 0:
        raise PRoLoRAError(
            "the expanded tensors of adapter_model.bin have no unshared rank, so the reference may have written "
            "them wider than the layer (it cuts them at Llama-2-7B lengths); the files do not say the layer sizes: "
            "pass --base MODEL (or keep the adapter_model.safetensors the trainer wrote next to it)",
            where,
        )
    _, u, m, n, strides_a, strides_b = best
    shared_r = r - u
    for key, value in (("unshared_r", u), ("sharing_rate_a", m), ("sharing_rate_b", n)):
        info.set(key, value, FROM_OPTIONS if key in stated else INFERRED)
    rotate, strides = _expanded_rotation(shared_r, m, n, strides_a, strides_b, options, info)
    others = [c for c in found if c is not best and c[0][0] == best[0][0]]
    if others:
        alternatives = ", ".join(f"u={c[1]} m={c[2]} n={c[3]}" for c in others[:3])
        info.notes.append(
            f"{len(others)} other chunk structure(s) with as few parameters also reproduce the tensors bitwise "
            f"({alternatives}{' …' if len(others) > 3 else ''}); took the smallest u, m, n"
        )
    elif len(found) > 1:
        info.notes.append(
            f"{len(found) - 1} less compact chunk structure(s) also reproduce the tensors; took the most compact"
        )
    config = _config(lora.config, r, u, m, n, rotate, strides, layer_sizes)
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        g = config.module_geometry(path)
        a, b = lora.factors[path]
        a, b = a[:, : g.in_features], b[: g.out_features]  # an over-wide tail was verified as the rotation's
        broken = rotation_mismatch(g, a, b)
        if broken:  # the search proved the structure: this would be a bug, never a user error
            raise AssertionError(f"module '{path}': {broken}")
        tensors.update({f"{path}.{k}": v for k, v in split_shards(g, a, b).items()})
    raise_if(tensor_problems(config, tensors), where)
    return Adapter(config, tensors), info, True


def _candidate(u: int, m: int, n: int, sides: dict[str, _Side], sizes: Shapes, r: int) -> tuple:
    """(sort key, u, m, n, A strides, B strides): fewest parameters first, then the smallest u, m, n."""
    shared_r = r - u
    params = sum(
        shared_r * (-(-d_in // m) + -(-d_out // n)) + u * (d_in + d_out) for d_in, d_out in sizes.values()
    )
    strides_a = sides["A"].rates.get(m, set(range(shared_r)))
    strides_b = sides["B"].rates.get(n, set(range(shared_r)))
    return ((params, u, m, n), u, m, n, strides_a, strides_b)


def _expanded_rotation(
    shared_r: int, m: int, n: int, strides_a: set[int], strides_b: set[int], options: ReadOptions, info: Inference
) -> tuple[bool, tuple[int | None, int | None]]:
    """Rotation and strides among those the tensors allow: the options' if stated (else refused), otherwise
    the reference's default strides, then rotation off, then the smallest strides that fit."""
    stated = options.stated()
    allowed = {"stride_a": strides_a if m > 1 else set(range(shared_r)),
               "stride_b": strides_b if n > 1 else set(range(shared_r))}
    defaults = {"stride_a": default_stride(shared_r, m) % shared_r, "stride_b": default_stride(shared_r, n) % shared_r}
    chosen: dict[str, int] = {}
    for key in ("stride_a", "stride_b"):
        value = _stride_value(stated.get(key), shared_r)
        if value is not None and value not in allowed[key]:
            raise _contradiction(key, stated[key], f"{key} ∈ {_span(allowed[key])} (mod r_s = {shared_r})",
                                 "its chunks are rotated by another stride")
        chosen[key] = value if value is not None else defaults[key]
    if options.rotate is False:
        if not all(0 in allowed[k] for k in allowed):
            raise _contradiction("rotate", False, "rotation on", "its chunks are rotated copies, not plain copies")
        info.set("rotate", False, FROM_OPTIONS)
        return False, (None, None)
    if options.rotate is None and not all(chosen[k] in allowed[k] for k in allowed):
        if all(0 in allowed[k] for k in allowed):  # plain copies: the paper's CLoRA ablation
            info.set("rotate", False, INFERRED)
            return False, (None, None)
        chosen = {k: v if v in allowed[k] else min(allowed[k]) for k, v in chosen.items()}
    info.set("rotate", True, FROM_OPTIONS if options.rotate is not None else INFERRED)
    for key in chosen:
        source = FROM_OPTIONS if key in stated else INFERRED
        info.set(key, chosen[key], source)
        if source == INFERRED and len(allowed[key]) > 1 and (m if key == "stride_a" else n) > 1:
            info.notes.append(f"{key}: strides {_span(allowed[key])} all reproduce the tensors; took {chosen[key]}")
    return True, (chosen["stride_a"], chosen["stride_b"])


def _expanded_sizes(
    lora: LoraFactors, sizes: Shapes | None, where: str, sizes_from: str, info: Inference
) -> tuple[Shapes, list[str]]:
    """Layer sizes: from ``sizes`` when known (tensors may then be wider, never narrower), else the tensors'."""
    found: Shapes = {}
    over_wide: list[str] = []
    problems = []
    for path, (a, b) in sorted(lora.factors.items()):
        width = (a.shape[1], b.shape[0])
        if sizes is None:
            found[path] = width
            continue
        if path not in sizes:
            problems.append(f"module '{path}' does not exist in the base model (or is not a Linear layer)")
            continue
        found[path] = sizes[path]
        if width[0] < sizes[path][0] or width[1] < sizes[path][1]:
            problems.append(
                f"module '{path}' is {sizes[path][0]}→{sizes[path][1]} but its lora_A/lora_B are only "
                f"{width[0]}/{width[1]} wide: cut shorter than the layer (the reference's fixed Llama-2-7B "
                "lengths), so the rest is lost; read the training layout (adapter_model.safetensors, checkpoint-N/)"
            )
        elif width != sizes[path]:
            over_wide.append(path)
    raise_if(problems, where)
    if sizes is None:
        info.notes.append("layer sizes from the tensor widths (pass --base to check them against the model)")
    else:
        info.notes.append(f"layer sizes from {sizes_from}")
    if over_wide:
        info.notes.append(
            f"{len(over_wide)} layer(s) stored wider than the layer (e.g. '{over_wide[0]}'); the tails were verified "
            "to continue the rotation and cut off"
        )
    return found, over_wide


def _plain(
    lora: LoraFactors,
    options: ReadOptions,
    info: Inference,
    sizes: Shapes,
    where: str,
    compact: bool,
    broken: tuple[int, str] | None,
    stated: dict[str, Any],
) -> tuple[Adapter, Inference, bool]:
    """No chunk structure with m ≥ 2 or n ≥ 2 reproduces the tensors: a genuine plain LoRA."""
    claims = [k for k in ("sharing_rate_a", "sharing_rate_b") if stated.get(k, 1) > 1]
    claims += ["unshared_r"] if stated.get("unshared_r", lora.r) < lora.r else []
    detail = broken[1] if broken else "no chunk of A or B repeats chunk 0"
    if claims:
        key = claims[0]
        raise PRoLoRAError(
            f"{OPTION_NAMES[key]} {stated[key]} contradicts the tensors: no chunk structure with the stated "
            f"values reproduces them bitwise ({detail})",
            where,
        )
    wide = [p for p, (a, b) in sorted(lora.factors.items()) if (a.shape[1], b.shape[0]) != sizes[p]]
    if wide:
        raise PRoLoRAError(
            f"module '{wide[0]}': its lora_A/lora_B are wider than the layer and no chunk structure explains the "
            f"extra part as the rotation's continuation, so it cannot be cut off safely ({detail})",
            where,
        )
    if compact:
        raise PRoLoRAError(
            "a plain PEFT LoRA adapter cannot be converted to PRoLoRA: no chunk structure (m ≥ 2 or n ≥ 2, any "
            f"unshared rank and stride) reproduces its tensors bitwise, so there are no shared chunks to compact "
            f"(first to break every candidate: {detail})",
            where,
        )
    from .peft_lora import factors_as_adapter

    lora = LoraFactors(lora.r, lora.lora_alpha, {p: (a[:, : sizes[p][0]], b[: sizes[p][1]])
                                                 for p, (a, b) in lora.factors.items()}, lora.config)
    for key, value in (("unshared_r", lora.r), ("sharing_rate_a", 1), ("sharing_rate_b", 1)):
        info.set(key, value, INFERRED)
    info.notes.append("no PRoLoRA chunk structure: read as plain LoRA (u = r), exact but not compact")
    return factors_as_adapter(lora), info, False
