"""Build the native ``RotatedShardLoRA`` kernel: ``python -m prolora_export.native.build``.

1. ONNX Runtime's C/C++ headers come from the npm package :data:`HEADERS_PACKAGE` (its
   ``onnxruntime.framework/Headers`` folder holds ORT 1.29's headers; no PyPI package ships them). The
   tarball is fetched once with ``npm pack`` into the cache (``~/.cache/prolora-export/ort-headers``,
   or ``$PROLORA_CACHE``), its sha256 is checked against :data:`HEADERS_SHA256`, and only the header files
   are extracted. The headers are never committed.
2. The system C++ compiler (``$CXX`` or ``g++``) builds ``libprolora_ort.so`` into the package
   (:data:`FLAGS`: ``-std=c++17 -O3 -fPIC -shared``, FMA contraction allowed as ONNX Runtime's own
   kernels do); the library needs no link against ONNX Runtime.
3. ``build-status.json`` records the outcome. When anything is missing (compiler, npm, network, a hash
   mismatch) the build still exits 0, prints ONE line saying why, and sessions use the function body.

An up-to-date library (same source, flags and headers) is not rebuilt. ``--strict`` exits 1 on a fallback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from . import HERE, LIBRARY_NAME, SOURCE, STATUS_NAME

HEADERS_PACKAGE = "com.github.asus4.onnxruntime"
HEADERS_VERSION = "0.4.9"  # carries ONNX Runtime 1.29.0's headers (ORT_API_VERSION 29)
HEADERS_SHA256 = "e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d"
HEADERS_IN_TARBALL = "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers/"
TARBALL = f"{HEADERS_PACKAGE}-{HEADERS_VERSION}.tgz"
FLAGS = ["-std=c++17", "-O3", "-ffp-contract=fast", "-fPIC", "-shared", "-fvisibility=hidden"]


class Fallback(Exception):
    """The one-line reason the library cannot be built here."""


def default_cache() -> Path:
    return Path(os.environ.get("PROLORA_CACHE", Path.home() / ".cache" / "prolora-export")) / "ort-headers"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_tarball(cache: Path) -> Path:
    """The pinned npm tarball in ``cache``, downloaded with ``npm pack`` when absent; hash-checked."""
    tarball = cache / TARBALL
    if not tarball.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise Fallback(f"npm not found, cannot fetch the ONNX Runtime headers "
                           f"({HEADERS_PACKAGE}@{HEADERS_VERSION})")
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".npm-pack-") as scratch:
            try:
                done = subprocess.run([npm, "pack", f"{HEADERS_PACKAGE}@{HEADERS_VERSION}", "--silent"], cwd=scratch,
                                      capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise Fallback(f"npm pack {HEADERS_PACKAGE}@{HEADERS_VERSION} failed ({err})") from None
            got = Path(scratch) / TARBALL
            if done.returncode != 0 or not got.is_file():
                last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
                raise Fallback(f"npm pack {HEADERS_PACKAGE}@{HEADERS_VERSION} failed (offline?): {last}")
            os.replace(got, tarball)
    digest = sha256(tarball)
    if digest != HEADERS_SHA256:
        tarball.unlink()
        raise Fallback(f"{TARBALL} has sha256 {digest}, expected {HEADERS_SHA256}: refused and removed")
    return tarball


def headers(cache: Path) -> Path:
    """The folder of extracted ONNX Runtime headers (extracted once per pinned version)."""
    folder = cache / f"{HEADERS_PACKAGE}-{HEADERS_VERSION}" / "include"
    if (folder / "onnxruntime_cxx_api.h").is_file():
        return folder
    tarball = fetch_tarball(cache)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".headers-"))
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive.getmembers():
                name = member.name[len(HEADERS_IN_TARBALL):] if member.name.startswith(HEADERS_IN_TARBALL) else ""
                if member.isfile() and name.endswith(".h") and "/" not in name:
                    with archive.extractfile(member) as src:  # plain files only: no links, no paths outside
                        (staging / name).write_bytes(src.read())
        if not (staging / "onnxruntime_cxx_api.h").is_file():
            raise Fallback(f"{TARBALL} holds no onnxruntime_cxx_api.h under {HEADERS_IN_TARBALL}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    except (OSError, tarfile.TarError) as err:
        raise Fallback(f"cannot extract the headers from {TARBALL} ({err})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise Fallback(f"no C++ compiler ({cxx}) found")
    return path


def fingerprint(cxx: str, flags: list[str], source: Path = SOURCE) -> str:
    """What the library depends on: source, flags, compiler and headers version."""
    return hashlib.sha256("\n".join([sha256(source), " ".join(flags), cxx, HEADERS_VERSION]).encode()).hexdigest()


def write_status(out: Path, status: dict) -> None:
    tmp = out / f".{STATUS_NAME}.tmp"
    tmp.write_text(json.dumps(status, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / STATUS_NAME)


def build(out: Path = HERE, cache: Path | None = None, force: bool = False,
          defines: tuple[str, ...] = (), source: Path = SOURCE) -> tuple[Path | None, str]:
    """Build the library into ``out``: (its path, one line) or (None, the reason it fell back).
    ``defines``: preprocessor symbols of a measurement variant (bench/bench_kernel.py's null kernel);
    ``source``: another version of the kernel's source (bench/bench_kernel.py --baseline)."""
    flags = [*FLAGS, *(f"-D{d}" for d in defines)]
    out.mkdir(parents=True, exist_ok=True)
    library = out / LIBRARY_NAME
    try:
        if os.environ.get("PROLORA_NO_NATIVE"):
            raise Fallback("PROLORA_NO_NATIVE is set")
        cxx = compiler()
        if not source.is_file():  # an install that did not ship the C++ source (package data)
            raise Fallback(f"the kernel source {source.name} is not installed")
        key = fingerprint(cxx, flags, source)
        previous = _status(out)
        if not force and library.is_file() and previous.get("built") and previous.get("fingerprint") == key:
            return library, f"native kernel up to date: {library}"
        include = headers(cache or default_cache())
        tmp = out / f".{LIBRARY_NAME}.tmp"
        cmd = [cxx, *flags, "-I", str(include), str(source), "-o", str(tmp)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise Fallback(f"{cxx} failed to run ({err})") from None
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
            raise Fallback(f"{Path(cxx).name} could not compile the kernel: {first[:300]}")
        os.replace(tmp, library)
    except Fallback as why:
        library.unlink(missing_ok=True)
        write_status(out, {"built": False, "reason": str(why)})
        return None, f"native kernel not built, the ONNX function body will be used: {why}"
    write_status(out, {"built": True, "library": library.name, "fingerprint": key, "compiler": cxx,
                       "headers": f"{HEADERS_PACKAGE}@{HEADERS_VERSION} (sha256 {HEADERS_SHA256})", "flags": flags})
    return library, f"native kernel built: {library}"


def _status(out: Path) -> dict:
    try:
        return json.loads((out / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prolora_export.native.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the library and build-status.json")
    parser.add_argument("--cache", type=Path, default=None, help="download cache (default ~/.cache/prolora-export)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the library cannot be built")
    args = parser.parse_args(argv)
    library, line = build(args.out, args.cache, args.force)
    print(line)
    return 1 if library is None and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
