"""The one place that builds ONNX Runtime sessions for every part of the project.

Parity, the benchmarks, the examples, the engine and the tests all get their
``SessionOptions`` and ``InferenceSession`` here, so the choices below hold everywhere:

* providers by short name (``cpu``/``cuda``), refused with one line when this ONNX Runtime
  build lacks one, and a check that the session really runs on the provider asked for
  (ONNX Runtime silently falls back to the CPU when CUDA libraries are missing);
* log level "errors only": a compact graph's overridable shard initializers make ONNX
  Runtime print one warning each at load (840 for the demo model). Users of plain ONNX
  Runtime silence it the same way: ``SessionOptions.log_severity_level = 3``;
* thread counts, when a caller (a benchmark) needs them fixed, and one intra-op pool shared by every
  session of the process (:func:`share_thread_pool`) where several sessions take turns: each session's own
  pool spins its threads after a run, and they took the cores from the next session's run (four sessions
  of two demo graphs, alternating: 8–15 ms per token against 6.5–8);
* the native ``RotatedShardLoRA`` kernel (:mod:`prolora_export.native`), registered in CPU sessions
  only: a CPU kernel registered in a CUDA session would claim every adapter node and pull it onto the
  CPU with copies around it. ``kernel="auto"`` registers it when it was built, ``"native"`` requires it,
  ``"function"`` never registers it (the graph's function body then runs). Registering it adds nothing
  to ONNX Runtime's load-time output;
* with that kernel, each adapted projection's adapter nodes fused into one native node at load
  (:mod:`prolora_export.native.fuse`: same numbers, fewer nodes; the file is not changed);
* for long-lived sessions (the engine, the benchmarks), the memory the load created rebuilt as huge
  pages (:mod:`prolora_export.hugepages`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PRoLoRAError

#: short provider names accepted by every command and function
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

#: ONNX Runtime severity: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal
ERRORS_ONLY = 3

#: how ``ai.prolora::RotatedShardLoRA`` runs: native kernel when built, native kernel or an error, function body
KERNELS = ("auto", "native", "function")
#: the ``ai.prolora`` op types the native library implements (others keep their function body)
NATIVE_OPS = ("RotatedShardLoRA", "RotatedShardLoRASlots")
#: graphs larger than this (weights inside the file: optimum's) are loaded as they are, never fused: parsing
#: and re-serializing them would hold the weights twice
FUSE_MAX_BYTES = 64 << 20
#: ONNX Runtime's key for where a graph loaded from bytes finds its external data
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
#: what :func:`inference_session` does with the memory a load created: nothing, huge pages before it
#: returns, huge pages from a background thread
HUGE_PAGES = ("off", "wait", "background")


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


_shared_pool: list[int] = []  # the threads of the process-wide pool, once share_thread_pool made it


def share_thread_pool(threads: int) -> None:
    """Run every later session of this process on one intra-op pool of ``threads`` threads (and one inter-op
    thread), for processes that alternate between sessions (benchmarks): separate pools spin their idle
    threads against each other. Call it before the first session; ``threads`` then binds every session."""
    import onnxruntime as ort

    if _shared_pool:
        if _shared_pool[0] != threads:
            raise PRoLoRAError(f"this process already shares a pool of {_shared_pool[0]} threads, not {threads}")
        return
    ort.set_global_thread_pool_sizes(threads, 1)
    _shared_pool.append(threads)


def session_options(provider: str = "cpu", *, threads: int | None = None, log_level: int = ERRORS_ONLY,
                    kernel: str = "auto"):
    """SessionOptions for ``provider``: errors-only logging, the native kernel per ``kernel`` (see
    :func:`register_kernel`) and, when given, ``threads`` intra-op threads (one inter-op thread then, so a
    benchmark's graphs differ only in the graph); after :func:`share_thread_pool`, the shared pool."""
    import onnxruntime as ort

    require_provider(provider)
    options = ort.SessionOptions()
    options.log_severity_level = log_level
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if _shared_pool:
        if threads is not None and threads != _shared_pool[0]:
            raise PRoLoRAError(f"{threads} threads asked for, but this process shares a pool of {_shared_pool[0]}")
        options.use_per_session_threads = False
    elif threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    register_kernel(options, provider, kernel)
    return options


def kernel_library(provider: str = "cpu", kernel: str = "auto") -> Path | None:
    """The native ``RotatedShardLoRA`` library a session on ``provider`` should register, or None.

    ``auto``: on the CPU when the library was built (else the function body, as the build said);
    ``native``: on the CPU or an error saying why not; ``function``: never. Never on CUDA.
    """
    from . import native

    if kernel not in KERNELS:
        raise PRoLoRAError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}", "--kernel")
    if kernel == "function":
        return None
    if provider != "cpu":
        if kernel == "native":
            raise PRoLoRAError(f"the native RotatedShardLoRA kernel runs on the CPU only, not {provider} "
                               "(its function body runs there: --kernel auto or function)", "--kernel native")
        return None
    library = native.library_path()
    if library is None and kernel == "native":
        raise PRoLoRAError(f"no native kernel: {native.unavailable_reason()}", "--kernel native")
    return library


def register_kernel(options, provider: str = "cpu", kernel: str = "auto") -> bool:
    """Register the library of :func:`kernel_library` in ``options``; True when it was registered."""
    library = kernel_library(provider, kernel)
    if library is None:
        return False
    try:
        options.register_custom_ops_library(str(library))
    except Exception as err:  # an unloadable library: say so once, and let auto fall back
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        if kernel == "native":
            raise PRoLoRAError(f"ONNX Runtime cannot load the native kernel ({first})", str(library)) from None
        _UNLOADABLE.add(str(library))
        _warn_once(f"native RotatedShardLoRA kernel not loaded, using the function body: {first}")
        return False
    return True


_WARNED: set[str] = set()
_UNLOADABLE: set[str] = set()  # native libraries ONNX Runtime refused here


def native_registered(provider: str = "cpu", kernel: str = "auto") -> bool:
    """Whether sessions built by :func:`session_options` (``provider``, ``kernel``) run the native kernel."""
    library = kernel_library(provider, kernel)
    return library is not None and str(library) not in _UNLOADABLE


def _warn_once(message: str) -> None:
    import warnings

    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_providers(used: list[str], provider: str) -> None:
    """Refuse a session whose first provider is not the one asked for (a silent CPU fallback)."""
    wanted = PROVIDERS[provider]
    if not used or used[0] != wanted:
        raise PRoLoRAError(f"asked for {wanted} but ONNX Runtime fell back to {used[0] if used else 'nothing'} "
                           f"(session providers: {', '.join(used)}); check the CUDA/cuDNN libraries "
                           "onnxruntime-gpu needs", f"--provider {provider}")


def fused_model(model: str | bytes, options) -> str | bytes:
    """``model`` (a file or serialized bytes) with each adapted projection's adapter nodes as one native node
    (:func:`.native.fuse.fuse_adapter_nodes`), as bytes; a file's external data is then found through
    ``options``. As it was when nothing fuses or it is over :data:`FUSE_MAX_BYTES`."""
    import onnx
    from google.protobuf.message import DecodeError

    from .native.fuse import fuse_adapter_nodes

    try:
        if (len(model) if isinstance(model, bytes) else os.path.getsize(model)) > FUSE_MAX_BYTES:
            return model
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model, load_external_data=False)
    except (OSError, DecodeError):  # no file, or not a model: ONNX Runtime says so in its own words, as unfused
        return model
    if not fuse_adapter_nodes(proto):
        return model
    if not isinstance(model, bytes):
        options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(Path(model).resolve().parent))
    return proto.SerializeToString()


def inference_session(model: str | Path | bytes, provider: str = "cpu", *, threads: int | None = None,
                      options=None, kernel: str = "auto", fuse: bool | None = None, huge_pages: str = "off"):
    """An InferenceSession on ``provider`` for a model path (a folder means its ``model.onnx``) or
    serialized bytes, with :func:`session_options` (``threads``, ``kernel``) unless ``options`` are given;
    checked for fallback. ``fuse``: load the graph through :func:`fused_model` (``options`` must then
    register a native library); default: when the session runs the package's native kernel.
    ``huge_pages`` (:data:`HUGE_PAGES`): rebuild the memory the load created as huge pages
    (:class:`.hugepages.LoadedMemory`), for sessions that decode many tokens; CPU sessions only."""
    import onnxruntime as ort

    from .hugepages import LoadedMemory

    if huge_pages not in HUGE_PAGES:
        raise PRoLoRAError(f"huge_pages must be one of {', '.join(HUGE_PAGES)}, not {huge_pages!r}")
    wanted = require_provider(provider)
    if isinstance(model, (str, Path)):
        model = Path(model)
        if model.is_dir():
            model = model / "model.onnx"
        model = str(model)
    if fuse is None and options is None:
        options = session_options(provider, threads=threads, kernel=kernel)
        fuse = native_registered(provider, kernel)  # after session_options: it records a library ONNX Runtime refused
    options = options if options is not None else session_options(provider, threads=threads, kernel=kernel)
    if fuse:
        model = fused_model(model, options)
    providers = [wanted] if provider == "cpu" else [wanted, PROVIDERS["cpu"]]
    with LoadedMemory(background=huge_pages == "background", active=huge_pages != "off" and provider == "cpu"):
        session = ort.InferenceSession(model, options, providers=providers)
    check_providers(session.get_providers(), provider)
    return session
