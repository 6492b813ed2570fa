"""Finding the CUDA compiler and the TensorRT plugin headers for building the plugin library.

nvcc: an explicit CUDA_HOME / CUDA_PATH wins, then the PyPI CUDA compiler (`tokenskip[cuda]`,
site-packages/nvidia/cu13), then nvcc on PATH, then /usr/local/cuda. Headers: a real TensorRT
install (TENSORRT_INCLUDE_DIR, TENSORRT_ROOT/include, the system include path), else the pinned
PyPI package kernel-lens==2.0.1 (MIT; it carries the Apache-2.0 TensorRT 10.14 plugin headers),
downloaded once with `pip download --no-deps` into the cache and verified by sha256. Headers are
never copied into the repo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tokenskip.errors import UserError

INSTALL_HINT = "install the extra: pip install 'tokenskip[cuda]'"
HEADER = "NvInferRuntime.h"
SYSTEM_CUDA = Path("/usr/local/cuda")

# Pinned header package: name, version, wheel file and its sha256 (computed once, 2026-11-23).
KERNEL_LENS = "kernel-lens==2.0.1"
KERNEL_LENS_WHEEL = "kernel_lens-2.0.1-py3-none-any.whl"
KERNEL_LENS_SHA256 = "07cc714e8b5e7f34b672f7c7fad93febe7c747be5837ba276b1527370134ffe0"
KERNEL_LENS_INCLUDE = "kernel_lens/include/tensorrt/"


@dataclasses.dataclass(frozen=True)
class Nvcc:
    """An nvcc executable, the library folder to link against, and its version banner."""

    path: Path
    lib_dir: Path | None
    origin: str  # "CUDA_HOME", "pypi", "PATH", "/usr/local/cuda"

    def version(self) -> str:
        try:
            out = subprocess.run([str(self.path), "--version"], capture_output=True, text=True, timeout=60)
        except OSError as exc:
            raise UserError(f"nvcc at {self.path} cannot run ({exc}): {INSTALL_HINT}") from None
        lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
        return lines[-1] if lines else "unknown"


def _lib_dir(root: Path) -> Path | None:
    for name in ("lib64", "lib"):
        if (root / name).is_dir():
            return root / name
    return None


def _pypi_cuda_root() -> Path | None:
    try:
        import nvidia  # namespace package of the PyPI CUDA wheels
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        root = Path(base) / "cu13"
        if (root / "bin" / "nvcc").is_file():
            return root
    return None


def find_nvcc() -> Nvcc:
    """The nvcc to use, or a UserError telling how to get one."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            nvcc = Path(root) / "bin" / "nvcc"
            if not nvcc.is_file():
                raise UserError(f"{var}={root} has no bin/nvcc: fix {var}, unset it, or {INSTALL_HINT}")
            return Nvcc(nvcc, _lib_dir(Path(root)), var)
    root = _pypi_cuda_root()
    if root is not None:
        return Nvcc(root / "bin" / "nvcc", root / "lib", "pypi")
    on_path = shutil.which("nvcc")
    if on_path:
        real = Path(on_path).resolve()
        return Nvcc(real, _lib_dir(real.parent.parent), "PATH")
    default = SYSTEM_CUDA / "bin" / "nvcc"
    if default.is_file():
        return Nvcc(default, _lib_dir(SYSTEM_CUDA), str(SYSTEM_CUDA))
    raise UserError(f"nvcc (the CUDA compiler) not found: no CUDA_HOME, no PyPI CUDA compiler, no nvcc on PATH: "
                    f"{INSTALL_HINT}")


def _has_header(d: Path) -> bool:
    return (d / HEADER).is_file()


def find_tensorrt_include(cache: Path) -> tuple[Path, str]:
    """(include dir holding NvInferRuntime.h, where it came from)."""
    env = os.environ.get("TENSORRT_INCLUDE_DIR")
    if env:
        if not _has_header(Path(env)):
            raise UserError(f"TENSORRT_INCLUDE_DIR={env} has no {HEADER}: point it at TensorRT's include folder")
        return Path(env), "TENSORRT_INCLUDE_DIR"
    root = os.environ.get("TENSORRT_ROOT")
    if root:
        if not _has_header(Path(root) / "include"):
            raise UserError(f"TENSORRT_ROOT={root} has no include/{HEADER}: point it at a TensorRT install")
        return Path(root) / "include", "TENSORRT_ROOT"
    for d in ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/include", "/usr/local/include",
              "/usr/local/TensorRT/include", "/opt/tensorrt/include"):
        if _has_header(Path(d)):
            return Path(d), "system"
    return pinned_headers(cache), KERNEL_LENS


def pinned_headers(cache: Path) -> Path:
    """TensorRT headers from the pinned kernel-lens wheel, fetched and verified once per cache."""
    dest = cache / "headers" / KERNEL_LENS.replace("==", "-")
    include = dest / KERNEL_LENS_INCLUDE
    if _has_header(include):
        return include
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kernel-lens-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, KERNEL_LENS]
        out = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / KERNEL_LENS_WHEEL
        if out.returncode != 0 or not wheel.is_file():
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"no TensorRT headers: set TENSORRT_INCLUDE_DIR, or allow `pip download {KERNEL_LENS}` "
                            f"(it failed: {last})")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != KERNEL_LENS_SHA256:
            raise UserError(f"{KERNEL_LENS_WHEEL} has sha256 {digest}, expected {KERNEL_LENS_SHA256}: refusing to use "
                            "it; set TENSORRT_INCLUDE_DIR to a TensorRT include folder instead")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(KERNEL_LENS_INCLUDE) and not m.endswith("/")]
            zf.extractall(unpacked, members)
        if dest.exists():  # a concurrent build may have finished first
            shutil.rmtree(unpacked)
        else:
            os.replace(unpacked, dest)
    return include
