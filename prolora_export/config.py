"""PRoLoRA hyperparameters (SPEC §1 table, §2 ``adapter_config.json``): a dataclass,
its validation, and JSON in and out. Unknown keys of a file are kept, not dropped."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import PRoLoRAError, raise_if
from .shards import ShardGeometry

FORMAT_NAME = "prolora"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
#: A layer wider than this is refused before anything is allocated (an adapter "for"
#: a 2^40-wide layer is a malformed or hostile file, not a model).
MAX_FEATURES = 1 << 20
MAX_RANK = 1 << 14


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class PRoLoRAConfig:
    """One set of hyperparameters shared by every adapted layer of an adapter."""

    r: int = 8
    unshared_r: int = 1
    sharing_rate_a: int = 2
    sharing_rate_b: int = 2
    rotate: bool = True
    stride_a: int | None = None
    stride_b: int | None = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    base_model_name_or_path: str | None = None
    #: module path -> {"in_features": d_in, "out_features": d_out}
    modules: dict[str, dict[str, int]] = field(default_factory=dict)
    #: keys of the file that this version does not know; written back unchanged
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shared_r(self) -> int:
        return self.r - self.unshared_r

    @property
    def scaling(self) -> float:
        """γ = α / r."""
        return self.lora_alpha / self.r

    def geometry(self, in_features: int, out_features: int) -> ShardGeometry:
        """The layer's geometry; sharing rates larger than the layer are refused (:meth:`size_problems`)."""
        raise_if(self.size_problems(in_features, out_features))
        return ShardGeometry.build(
            in_features,
            out_features,
            self.r,
            self.unshared_r,
            self.sharing_rate_a,
            self.sharing_rate_b,
            self.rotate,
            self.stride_a,
            self.stride_b,
        )

    def module_geometry(self, path: str) -> ShardGeometry:
        shape = self.modules[path]
        raise_if(self.size_problems(shape["in_features"], shape["out_features"]), f"module '{path}'")
        return self.geometry(shape["in_features"], shape["out_features"])

    def size_problems(self, in_features: int, out_features: int) -> list[str]:
        """Sharing rates the layer cannot take: A has ``in_features`` columns to cut into m chunks,
        B has ``out_features`` rows for n chunks (more chunks than that is no adapter, only memory)."""
        if self.shared_r <= 0:
            return []  # u = r: no shards, the sharing rates are unused
        out = []
        for key, letter, features, side in (
            ("sharing_rate_a", "m", in_features, "in_features"),
            ("sharing_rate_b", "n", out_features, "out_features"),
        ):
            if getattr(self, key) > features:
                out.append(f"'{key}' ({letter} = {getattr(self, key)}) is larger than the layer's {side} ({features})")
        return out

    # ------------------------------------------------------------------ validation
    def problems(self) -> list[str]:
        """Every hyperparameter problem, as messages naming the key and what was expected."""
        out: list[str] = []
        for key in ("r", "unshared_r", "sharing_rate_a", "sharing_rate_b"):
            if not _is_int(getattr(self, key)):
                out.append(f"'{key}' must be an integer, got {getattr(self, key)!r}")
        if out:
            return out
        if not 1 <= self.r <= MAX_RANK:
            out.append(f"'r' must be in [1, {MAX_RANK}], got {self.r}")
        if not 0 <= self.unshared_r <= self.r:
            out.append(f"'unshared_r' must be in [0, r={self.r}], got {self.unshared_r}")
        for key in ("sharing_rate_a", "sharing_rate_b"):
            value = getattr(self, key)
            if not 1 <= value <= MAX_FEATURES:
                out.append(f"'{key}' must be ≥ 1, got {value}")
        if not isinstance(self.rotate, bool):
            out.append(f"'rotate' must be true or false, got {self.rotate!r}")
        for key in ("stride_a", "stride_b"):
            value = getattr(self, key)
            if value is None:
                continue
            if not _is_int(value):
                out.append(f"'{key}' must be an integer or null, got {value!r}")
            elif not 0 <= value < max(self.shared_r, 1):
                out.append(f"'{key}' must be in [0, r - unshared_r = {self.shared_r}), got {value}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            out.append(f"'lora_alpha' must be a finite number, got {alpha!r}")
        drop = self.lora_dropout
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1:
            out.append(f"'lora_dropout' must be a number in [0, 1), got {drop!r}")
        targets = self.target_modules
        if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            out.append(f"'target_modules' must be a list of names or a regex string, got {targets!r}")
        rates_bad = bool(out)  # the checks against each layer's sizes need sound r, u, m and n
        if not isinstance(self.modules, dict):
            out.append("'modules' must map module paths to {in_features, out_features}")
            return out
        for path, shape in self.modules.items():
            if not isinstance(shape, dict) or set(shape) != {"in_features", "out_features"}:
                out.append(f"module '{path}': expected {{'in_features': int, 'out_features': int}}, got {shape!r}")
                continue
            sizes_ok = True
            for key, value in shape.items():
                if not _is_int(value) or not 1 <= value <= MAX_FEATURES:
                    out.append(f"module '{path}': '{key}' must be an integer in [1, {MAX_FEATURES}], got {value!r}")
                    sizes_ok = False
            if sizes_ok and not rates_bad:
                sizes = self.size_problems(shape["in_features"], shape["out_features"])
                out += [f"module '{path}': {p}" for p in sizes]
        return out

    def validate(self, where: str | None = None) -> PRoLoRAConfig:
        raise_if(self.problems(), where)
        return self

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        data = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        data.update({k: v for k, v in asdict(self).items() if k != "extra"})
        data.update(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | None = None) -> PRoLoRAConfig:
        if not isinstance(data, dict):
            raise PRoLoRAError(f"expected a JSON object, got {type(data).__name__}", where)
        if data.get("format") != FORMAT_NAME:
            raise PRoLoRAError(f"'format' must be \"{FORMAT_NAME}\", got {data.get('format')!r}", where)
        if data.get("format_version") != FORMAT_VERSION:
            raise PRoLoRAError(
                f"'format_version' {data.get('format_version')!r} is not supported (expected {FORMAT_VERSION})",
                where,
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [k for k in ("r", "unshared_r", "sharing_rate_a", "sharing_rate_b", "lora_alpha") if k not in data]
        raise_if([f"missing key '{k}'" for k in missing], where)
        values = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k not in ("format", "format_version")}
        return cls(**values, extra=extra).validate(where)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> PRoLoRAConfig:
        path = Path(directory) / CONFIG_NAME
        return cls.from_dict(read_json(path), where=str(path))


def parse_target_modules(value: str) -> list[str] | str:
    """A comma list of layer names (``q_proj,v_proj``) or, if it has regex characters, a regex."""
    if any(c in value for c in "^$*+?()[]|\\"):
        return value
    return [name.strip() for name in value.split(",") if name.strip()]


def read_json(path: Path) -> Any:
    """Read a JSON file, turning every way it can fail into a one-line :class:`PRoLoRAError`."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PRoLoRAError("file not found", str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise PRoLoRAError(f"cannot read: {err}", str(path)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PRoLoRAError(f"malformed JSON ({err.msg} at line {err.lineno}, column {err.colno})", str(path)) from None
