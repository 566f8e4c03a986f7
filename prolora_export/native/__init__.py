"""The native CPU kernel of ``ai.prolora::RotatedShardLoRA``: where the built library lives and why it may not.

The C++ source (``rotated_shard_lora.cc``) is compiled at set-up time by :mod:`.build` (``make setup`` runs
it) into ``libprolora_ort.so`` next to this file, from ONNX Runtime's C/C++ headers taken out of a pinned,
hash-checked npm package; nothing is compiled or downloaded at import. The build always records what it did
in ``build-status.json`` here: either the library it built or the one reason it could not (no compiler, no
npm, no network, …), in which case sessions use the op's function body. Both files are build outputs
(gitignored). :func:`prolora_export.runtime.session_options` is what registers the library in a session.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "rotated_shard_lora.cc"
LIBRARY_NAME = {"darwin": "libprolora_ort.dylib", "win32": "prolora_ort.dll"}.get(sys.platform, "libprolora_ort.so")
STATUS_NAME = "build-status.json"


def library_path(folder: Path = HERE) -> Path | None:
    """The built kernel library, or None when the build did not produce one."""
    path = folder / LIBRARY_NAME
    return path if path.is_file() else None


def build_status(folder: Path = HERE) -> dict | None:
    """What the last build recorded (``{"built": true, ...}`` or ``{"built": false, "reason": ...}``), or None
    when no build ran here."""
    try:
        return json.loads((folder / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def unavailable_reason(folder: Path = HERE) -> str | None:
    """Why there is no library (one line), or None when there is one."""
    if library_path(folder) is not None:
        return None
    status = build_status(folder)
    if status is None:
        return "the native kernel was never built (run: python -m prolora_export.native.build)"
    if status.get("built"):
        return "the build recorded a library that is no longer there (run: python -m prolora_export.native.build)"
    return str(status.get("reason") or "the build recorded no reason")
