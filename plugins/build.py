"""Compiling libtokenskip_plugins.so (both TensorRT plugins + the C kernel entry points).

The library is cached by a hash of the sources, the nvcc flags, the target architectures, the
compiler version and the headers, in `cache_dir()/plugins/<hash>/`, so a second build is free and
an edited source always rebuilds. The sources' own hash is compiled into the library
(`tokenskip_plugins_source_hash()`), so a stale library given by path is caught at engine build.
nvcc writes to a temporary file that is renamed into place: a failed or interrupted build never
leaves a partial .so behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tokenskip.errors import UserError
from tokenskip.fileio import atomic_path, cache_dir, write_json_atomic

from . import toolchain

LIB_NAME = "libtokenskip_plugins.so"
KERNELS_LIB_NAME = "libtokenskip_kernels.so"  # the CUDA kernels' C entry points alone (no TensorRT headers)
SOURCE_DIR = Path(__file__).resolve().parent
SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")
DEFAULT_ARCHS = ("80", "86", "89", "90", "120")  # + PTX of the newest, for future GPUs
BASE_FLAGS = ("-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
              "-Wno-deprecated-declarations", "--threads", "0")


def source_files() -> list[Path]:
    """Every C++/CUDA file of the library, in a stable order."""
    return sorted(p for p in SOURCE_DIR.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file())


def compile_units(kernels_only: bool = False) -> list[Path]:
    """The .cu/.cpp files to compile; kernels_only: the CUDA kernels and their C entry points (.cu)."""
    return [p for p in source_files() if p.suffix == ".cu" or (p.suffix == ".cpp" and not kernels_only)]


def source_hash() -> str:
    """sha256 over the relative paths and contents of the sources (what the library is built from)."""
    h = hashlib.sha256()
    for p in source_files():
        h.update(p.relative_to(SOURCE_DIR).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def parse_archs(arch: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """'90' / 'sm_90' / '8.6' / '80,90' / lists of those -> ['80', '90'] (sorted, unique)."""
    if arch is None:
        return list(DEFAULT_ARCHS)
    items = arch.split(",") if isinstance(arch, str) else [a for part in arch for a in str(part).split(",")]
    out = set()
    for raw in items:
        a = raw.strip().lower().removeprefix("sm_").removeprefix("sm").removeprefix("compute_").replace(".", "")
        if not a:
            continue
        if not a.isdigit() or not 50 <= int(a) <= 200:
            raise UserError(f"--arch {raw.strip()!r}: expected compute capabilities like 90, sm_90 or 8.6")
        out.add(a)
    if not out:
        raise UserError("--arch: no architecture given")
    return sorted(out, key=int)


def arch_flags(archs: list[str]) -> list[str]:
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    newest = archs[-1]
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]  # PTX, JIT-compiled on newer GPUs
    return flags


def build_library(arch: str | list[str] | None = None, force: bool = False, *, cache: Path | None = None,
                  verbose: bool = False, kernels_only: bool = False) -> Path:
    """Compile (or reuse) libtokenskip_plugins.so for `arch` (default: sm_80/86/89/90/120 + PTX).

    kernels_only: libtokenskip_kernels.so, the CUDA kernels and their C entry points without the
    TensorRT plugins, so no TensorRT headers are needed (the GPU tests and benchmark on a machine
    with no TensorRT). Returns the library path. Raises UserError with one line when nvcc or the
    headers are missing or the compile fails (the full log is kept next to where the library would
    have been).
    """
    archs = parse_archs(arch)
    cache = Path(cache) if cache is not None else cache_dir() / "plugins"
    nvcc = toolchain.find_nvcc()
    include, include_origin = (None, None) if kernels_only else toolchain.find_tensorrt_include(cache)
    src_hash = source_hash()
    flags = [*BASE_FLAGS, *arch_flags(archs), f"-DTOKENSKIP_SOURCE_HASH=\"{src_hash}\""]
    version_header = None if include is None else include / "NvInferVersion.h"
    key = hashlib.sha256(json.dumps({
        "sources": src_hash, "flags": flags, "nvcc": nvcc.version(), "kernels_only": kernels_only,
        "headers": hashlib.sha256(version_header.read_bytes()).hexdigest()
        if version_header is not None and version_header.is_file() else "",
    }, sort_keys=True).encode()).hexdigest()[:20]
    out_dir = cache / key
    lib = out_dir / (KERNELS_LIB_NAME if kernels_only else LIB_NAME)
    if lib.is_file() and not force:
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "nvcc.log"
    with atomic_path(lib) as tmp:
        cmd = [str(nvcc.path), *flags, *([] if include is None else [f"-I{include}"]), f"-I{SOURCE_DIR}"]
        if nvcc.lib_dir is not None:
            cmd.append(f"-L{nvcc.lib_dir}")  # libcudadevrt / libcudart_static of that toolkit
        cmd += [str(p) for p in compile_units(kernels_only)] + ["-o", str(tmp)]
        if verbose:
            print(f"compiling {lib.name} for sm_{', sm_'.join(archs)} with {nvcc.path} ({nvcc.origin}) ...",
                  file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            raise UserError(f"nvcc at {nvcc.path} cannot run ({exc}): {toolchain.INSTALL_HINT}") from None
        log.write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr, encoding="utf-8")
        if proc.returncode != 0:
            errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error" in ln.lower()]
            first = errors[0].strip() if errors else f"exit code {proc.returncode}"
            raise UserError(f"nvcc failed: {first} (full log: {log})")
        seconds = time.monotonic() - t0
        os.chmod(tmp, 0o755)  # mkstemp made it 0600
    write_json_atomic(out_dir / "build.json", {
        "library": lib.name, "source_hash": src_hash, "kernels_only": kernels_only, "archs": archs, "ptx": archs[-1],
        "flags": flags,
        "nvcc": str(nvcc.path), "nvcc_origin": nvcc.origin, "nvcc_version": nvcc.version(),
        "tensorrt_include": None if include is None else str(include), "tensorrt_include_origin": include_origin,
        "compile_seconds": round(seconds, 1)})
    return lib


def library_source_hash(lib: str | os.PathLike) -> str:
    """The source hash compiled into a plugin library (UserError if it is not one of ours)."""
    path = Path(lib)
    if not path.is_file():
        raise UserError(f"plugin library not found: {path}")
    try:
        handle = ctypes.CDLL(str(path.resolve()))
        fn = handle.tokenskip_plugins_source_hash
    except (OSError, AttributeError) as exc:
        raise UserError(f"{path} is not a tokenskip plugin library ({exc})") from None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def check_library(lib: str | os.PathLike) -> Path:
    """Raise UserError unless `lib` was built from the sources of this checkout."""
    built, here = library_source_hash(lib), source_hash()
    if built != here:
        raise UserError(f"plugin library {lib} was built from other sources (hash {built[:12]}, these sources "
                        f"{here[:12]}): rebuild it with `tokenskip plugins build`")
    return Path(lib)
