"""Which of the project's environments exports which graph: optimum-onnx caps transformers below 4.58 and
the model builder needs transformers 5, so the two routes live in two venvs (see the Makefile) and a
bench comparing them runs each export with that venv's CLI."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the project's venvs, in the order they are tried
VENVS = (".venv", ".venv-optimum", ".venv-tf5")
#: a route -> the import that proves a venv can export it
PROBES = {
    "optimum": "import optimum.exporters.onnx",
    "builder": "import onnxruntime_genai, transformers; assert int(transformers.__version__.split('.')[0]) >= 5",
}


@functools.cache
def cli_for(route: str) -> Path | None:
    """``prolora-export`` of the first venv that can export ``route`` (optimum or builder); None if none can."""
    for venv in VENVS:
        python = ROOT / venv / "bin" / "python"
        if python.is_file() and subprocess.run([str(python), "-c", PROBES[route]], capture_output=True).returncode == 0:
            return python.parent / "prolora-export"
    return None
