"""The one place that builds ONNX Runtime sessions for every part of the project.

Parity, the benchmarks, the examples, the engine and the tests all get their
``SessionOptions`` and ``InferenceSession`` here, so the choices below hold everywhere:

* providers by short name (``cpu``/``cuda``), refused with one line when this ONNX Runtime
  build lacks one, and a check that the session really runs on the provider asked for
  (ONNX Runtime silently falls back to the CPU when CUDA libraries are missing);
* log level "errors only": a compact graph's overridable shard initializers make ONNX
  Runtime print one warning each at load (840 for the demo model). Users of plain ONNX
  Runtime silence it the same way: ``SessionOptions.log_severity_level = 3``;
* thread counts, when a caller (a benchmark) needs them fixed.
"""

from __future__ import annotations

from pathlib import Path

from .errors import PRoLoRAError

#: short provider names accepted by every command and function
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

#: ONNX Runtime severity: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal
ERRORS_ONLY = 3


def require_provider(provider: str) -> str:
    """The ORT provider name for ``cpu``/``cuda``; refuses one this ONNX Runtime build does not have."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise PRoLoRAError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}", "--provider")
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted not in available:
        raise PRoLoRAError(f"ONNX Runtime here has no {wanted} (available: {', '.join(available)}); "
                           "install onnxruntime-gpu with a matching CUDA/cuDNN", f"--provider {provider}")
    return wanted


def session_options(provider: str = "cpu", *, threads: int | None = None, log_level: int = ERRORS_ONLY):
    """SessionOptions for ``provider``: errors-only logging and, when given, ``threads`` intra-op threads
    (one inter-op thread then, so a benchmark's graphs differ only in the graph)."""
    import onnxruntime as ort

    require_provider(provider)
    options = ort.SessionOptions()
    options.log_severity_level = log_level
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def check_providers(used: list[str], provider: str) -> None:
    """Refuse a session whose first provider is not the one asked for (a silent CPU fallback)."""
    wanted = PROVIDERS[provider]
    if not used or used[0] != wanted:
        raise PRoLoRAError(f"asked for {wanted} but ONNX Runtime fell back to {used[0] if used else 'nothing'} "
                           f"(session providers: {', '.join(used)}); check the CUDA/cuDNN libraries "
                           "onnxruntime-gpu needs", f"--provider {provider}")


def inference_session(model: str | Path | bytes, provider: str = "cpu", *, threads: int | None = None,
                      options=None):
    """An InferenceSession on ``provider`` for a model path (a folder means its ``model.onnx``) or
    serialized bytes, with :func:`session_options` unless ``options`` are given; checked for fallback."""
    import onnxruntime as ort

    wanted = require_provider(provider)
    if isinstance(model, (str, Path)):
        model = Path(model)
        if model.is_dir():
            model = model / "model.onnx"
        model = str(model)
    options = options if options is not None else session_options(provider, threads=threads)
    providers = [wanted] if provider == "cpu" else [wanted, PROVIDERS["cpu"]]
    session = ort.InferenceSession(model, options, providers=providers)
    check_providers(session.get_providers(), provider)
    return session
