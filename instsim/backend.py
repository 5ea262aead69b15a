"""Which implementation renders a NeRF: the CUDA kernels in ``cuda/`` or the pure-PyTorch path.

The kernels are compiled at first use with :func:`torch.utils.cpp_extension.load` (ninja) into a build folder
keyed by a hash of the sources, the GPU architecture and the torch/CUDA versions, so an edited kernel, another
GPU or another torch never picks up a stale build, and a second process (or a second Snakemake job) reuses the
first one's build. The folder is ``$INSTSIM_KERNEL_CACHE`` or ``~/.cache/instsim/kernels``.

Config ``nerf.backend``:

* ``torch``: always the PyTorch path (CPU and GPU);
* ``cuda``: the kernels; a missing GPU, nvcc, compiler or ninja, or a failed build, is an error that says so;
* ``auto`` (default): the kernels when the model is on a GPU and they build, else the PyTorch path, with the
  reason logged.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

from .errors import ConfigError, InstsimError

__all__ = ["BACKENDS", "DEVICES", "resolve_device", "fallback_reason", "KERNEL_DIR", "build_key", "check_toolchain", "kernel_sources", "load_kernels", "uses_cuda"]

#: the config's ``nerf.backend`` values (module docstring)
BACKENDS = ("auto", "cuda", "torch")
#: the config's ``device`` values: ``auto`` takes a GPU when torch sees one (a NeRF's own ``device`` also takes
#: ``cuda:N``)
DEVICES = ("auto", "cpu", "cuda")
#: the kernel sources, shipped beside the package (repository root / cuda)
KERNEL_DIR = Path(__file__).resolve().parent.parent / "cuda"
_log = logging.getLogger("instsim.backend")
#: why ``auto`` took the PyTorch path on a GPU, by device (``"cuda:0"``): the kernels did not load. Stages whose
#: result depends on the path record it (:func:`fallback_reason`).
_FALLBACKS: dict[str, str] = {}


def resolve_device(name: str, source: str = "config", field: str = "device") -> torch.device:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; a CUDA device without a GPU is a
    :class:`ConfigError` naming ``source`` and ``field``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(source, field, f"{name!r} was asked for but torch sees no GPU; use 'auto' or 'cpu'")
    return dev


def kernel_sources() -> list[Path]:
    """The ``.cu``/``.cpp`` files of the extension (headers are hashed too, see :func:`build_key`)."""
    return sorted(p for p in KERNEL_DIR.glob("*") if p.suffix in (".cu", ".cpp"))


def build_key(arch: str) -> str:
    """Hash of every source and header, the GPU architecture (e.g. ``"9.0"``) and the torch/CUDA versions."""
    h = hashlib.sha256()
    for p in sorted(KERNEL_DIR.glob("*")):
        if p.suffix in (".cu", ".cpp", ".h", ".cuh"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update(f"{arch}|{torch.__version__}|{torch.version.cuda}".encode())
    return h.hexdigest()[:16]


def check_toolchain() -> None:
    """Raise :class:`InstsimError` naming what is missing to build the kernels: a CUDA build of torch, nvcc,
    a C++ compiler, ninja, the sources."""
    from torch.utils import cpp_extension  # imported here: it pulls in setuptools, needed only to build the kernels

    if torch.version.cuda is None:
        raise InstsimError("the CUDA kernels need a CUDA build of torch; this one is CPU-only (use nerf.backend: torch)")
    if not kernel_sources():
        raise InstsimError(f"no kernel sources in {KERNEL_DIR} (is instsim installed from a source checkout?)")
    nvcc = Path(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    if cpp_extension.CUDA_HOME is None or not nvcc.is_file():
        raise InstsimError(
            f"nvcc not found (CUDA_HOME={cpp_extension.CUDA_HOME!r}): install the CUDA toolkit matching torch's CUDA "
            f"{torch.version.cuda} and set CUDA_HOME, or use nerf.backend: torch"
        )
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise InstsimError(f"C++ compiler {cxx!r} not found (set CXX or install g++), or use nerf.backend: torch")
    if not cpp_extension.is_ninja_available():
        raise InstsimError("ninja not found: pip install ninja (a base dependency of instsim)")


@functools.cache
def load_kernels(device_index: int = 0) -> ModuleType:
    """Build (first time) and import the kernels for the GPU ``device_index``; cached per process.

    Raises:
        InstsimError: no GPU, a missing tool (see :func:`check_toolchain`) or a failed build (the compiler's
            message is in the error and the build folder's log).
    """
    if not torch.cuda.is_available():
        raise InstsimError("the CUDA kernels need a GPU, and torch sees none (use nerf.backend: torch)")
    check_toolchain()
    from torch.utils import cpp_extension  # imported here: it pulls in setuptools, needed only to build the kernels

    major, minor = torch.cuda.get_device_capability(device_index)
    arch = f"{major}.{minor}"
    key = build_key(arch)
    root = Path(os.environ.get("INSTSIM_KERNEL_CACHE", Path.home() / ".cache" / "instsim" / "kernels"))
    build_dir = root / key
    name = f"instsim_kernels_{key}"
    built = build_dir / f"{name}.so"
    if built.is_file():
        # the key already covers sources, GPU and versions: import the library without asking ninja again
        # (saves a second or more in every Snakemake job)
        _log.info("loading CUDA kernels for sm_%s%s from %s", major, minor, built)
        return _import_library(name, built)
    build_dir.mkdir(parents=True, exist_ok=True)
    # cpp_extension turns TORCH_CUDA_ARCH_LIST into -gencode flags: build for this GPU only (sm_90 on H100)
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        _log.info("loading CUDA kernels for sm_%s%s from %s", major, minor, build_dir)
        module = cpp_extension.load(
            name=name,
            sources=[str(p) for p in kernel_sources()],
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr"],
            extra_include_paths=[str(KERNEL_DIR)],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as e:  # the compiler's output is in the exception text
        raise InstsimError(f"building the CUDA kernels in {build_dir} failed (use nerf.backend: torch to skip):\n{e}") from e
    finally:
        if old_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
    return module


def _import_library(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InstsimError(f"cannot import the CUDA kernels from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _resolve(name: str, device_type: str, device_index: int) -> bool:
    if name not in BACKENDS:
        raise InstsimError(f"nerf.backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "torch":
        _log.info("NeRF backend: torch (configured)")
        return False
    if device_type != "cuda":
        if name == "cuda":
            raise InstsimError("nerf.backend is 'cuda' but the model is on the CPU (set device: cuda, or backend: auto)")
        _log.info("NeRF backend: torch (the model is on the CPU)")
        return False
    try:
        load_kernels(device_index)
    except InstsimError as e:
        if name == "cuda":
            raise
        _log.warning("NeRF backend: torch, because the CUDA kernels are not available: %s", e)
        _FALLBACKS[f"cuda:{device_index}"] = str(e)
        return False
    _log.info("NeRF backend: cuda (kernels from %s)", KERNEL_DIR)
    return True


def fallback_reason(device: torch.device | str) -> str | None:
    """Why ``backend: auto`` runs the PyTorch path on the GPU ``device`` (the kernels' load error), or None when it
    did not fall back there (it runs the kernels, was not asked yet, or ``device`` is the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _FALLBACKS.get(f"cuda:{index}")


def uses_cuda(name: str, device: torch.device) -> bool:
    """True when a model configured with backend ``name`` on ``device`` runs the CUDA kernels (decided once
    per process, backend and device; the choice is logged)."""
    index = 0
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    return _resolve(name, device.type, index)
