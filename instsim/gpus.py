"""One GPU per GPU stage on a host with several: each job claims a free device before CUDA starts.

Snakemake's local executor counts the ``gpu`` resource (so no more GPU jobs run at once than the host has
GPUs) but does not say *which* GPU a job gets: without help every job would run on device 0. A GPU stage
therefore enters :func:`claim_gpu` before it touches CUDA. It takes an exclusive lock on one lock file
per GPU and restricts the process to that GPU through ``CUDA_VISIBLE_DEVICES``.

- Where ``CUDA_VISIBLE_DEVICES`` is already set (SLURM sets it for a job with ``--gpus``; a user may set it
  by hand), the choice has been made: nothing happens.
- Without a GPU, nothing happens.
- The lock is an ``flock``: the kernel releases it when the holder exits, also when it is killed, so a
  crashed job never keeps a GPU claimed.

The lock files live in a folder on the local disk (``INSTSIM_GPU_LOCK_DIR``, else a per-user folder under
the system's temporary folder), not under the results folder: results are often on a shared filesystem,
where the lock on "GPU 0" of one node would block "GPU 0" of every other node. Being per host rather than per
run also keeps two runs on the same host off each other's GPUs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import InstsimError

__all__ = ["claim_gpu", "gpu_count", "lock_dir", "GpuBusyError", "LOCK_DIR_ENV"]

log = logging.getLogger("instsim.gpus")

#: environment variable naming the folder of the per-GPU lock files
LOCK_DIR_ENV = "INSTSIM_GPU_LOCK_DIR"


class GpuBusyError(InstsimError):
    """Every GPU of the host stayed claimed by other jobs for longer than the caller would wait."""


def gpu_count() -> int:
    """NVIDIA GPUs of this host (as the NVIDIA driver lists them), 0 without a driver.

    Asks ``nvidia-smi`` instead of torch: ``torch.cuda.device_count()`` starts the CUDA runtime in this
    process, after which a change of ``CUDA_VISIBLE_DEVICES`` no longer has any effect."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("nvidia-smi -L failed (%s): treating this host as having no GPU", e)
        return 0
    if proc.returncode != 0:  # e.g. "NVIDIA-SMI has failed because it couldn't communicate with the driver"
        return 0
    # One "GPU i: <name> (UUID: ...)" line per GPU; MIG instances are indented lines under their GPU.
    return sum(1 for line in proc.stdout.splitlines() if line.startswith("GPU "))


def lock_dir() -> Path:
    """The folder of the per-GPU lock files: ``$INSTSIM_GPU_LOCK_DIR``, else a per-user temporary folder."""
    env = os.environ.get(LOCK_DIR_ENV)
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"instsim-gpu-locks-{os.getuid()}"


def _cuda_started() -> bool:
    torch = sys.modules.get("torch")  # never import torch here only to ask
    return torch is not None and torch.cuda.is_initialized()


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on ``path``, or None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # Who holds it, for a person looking at the folder; the lock itself is the flock, not this text.
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextlib.contextmanager
def claim_gpu(
    directory: str | Path | None = None, poll_s: float = 1.0, timeout_s: float | None = None
) -> Iterator[int | None]:
    """Claim one free GPU of this host for the ``with`` block and make it the only one CUDA sees.

    Yields the claimed index (which ``CUDA_VISIBLE_DEVICES`` is set to), or None when nothing was done:
    ``CUDA_VISIBLE_DEVICES`` was already set (kept as it is) or the host has no GPU. When every GPU is
    claimed, waits (polling every ``poll_s`` seconds), at most ``timeout_s`` seconds if given, then raises
    :class:`GpuBusyError`. On exit the lock is released and ``CUDA_VISIBLE_DEVICES`` is unset again.
    Must be entered before CUDA starts in this process (RuntimeError otherwise)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        log.info("GPU already chosen: CUDA_VISIBLE_DEVICES=%r", os.environ["CUDA_VISIBLE_DEVICES"])
        yield None
        return
    n = gpu_count()
    if n == 0:
        yield None
        return
    if _cuda_started():
        raise RuntimeError("claim_gpu() must run before CUDA is used in this process: the device is fixed now")
    folder = Path(directory) if directory is not None else lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    waited_note = False
    while True:
        for index in range(n):
            fd = _try_lock(folder / f"gpu{index}.lock")
            if fd is None:
                continue
            os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
            log.info("claimed GPU %d of %d (CUDA_VISIBLE_DEVICES=%d, lock %s)", index, n, index, folder)
            try:
                yield index
            finally:
                del os.environ["CUDA_VISIBLE_DEVICES"]
                os.close(fd)  # closing the only descriptor releases the flock
            return
        waited = time.monotonic() - start
        if timeout_s is not None and waited >= timeout_s:
            raise GpuBusyError(f"all {n} GPUs stayed claimed for {waited:.0f} s (locks in {folder})")
        if not waited_note:
            log.info("all %d GPUs are claimed by other jobs (locks in %s): waiting for one", n, folder)
            waited_note = True
        time.sleep(poll_s)
