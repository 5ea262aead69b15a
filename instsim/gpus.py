"""GPU stages on a host's GPUs: each job claims a slot on a GPU before CUDA starts.

Snakemake's local executor counts the ``gpu`` resource but does not say *which* GPU a job gets: without help
every job would run on device 0. ``profiles/default`` sets the ``gpu`` limit to the host's GPUs times
:func:`jobs_per_gpu` (each GPU stage asks for ``gpu=1``), so that GPU jobs that fit share a card, and a GPU
stage enters :func:`claim_gpu` before it touches CUDA. That takes an exclusive lock on one of the
``jobs_per_gpu()`` slot files of the GPU with the fewest jobs on it (so on a host with several GPUs,
concurrent jobs spread over all of them before any two share one) and restricts the process to that GPU
through ``CUDA_VISIBLE_DEVICES``.

- Where ``CUDA_VISIBLE_DEVICES`` is already set to one device (SLURM sets it for a job with ``--gpus=1``; a
  user may set it by hand), the choice has been made: nothing happens. Where a user lists several, jobs
  claim among those.
- Without a GPU, nothing happens.
- The locks are flocks: the kernel releases them when the holder exits, also when it is killed, so a
  crashed job never keeps a slot claimed. A short-lived lock on ``claim.lock`` makes "count the jobs on each
  GPU, take a slot on the least-loaded" one step, so two jobs starting together never pick the same GPU
  while another has room.

The lock files live in a folder on the local disk (``INSTSIM_GPU_LOCK_DIR``, else a per-user folder under
the system's temporary folder), not under the results folder: results are often on a shared filesystem,
where the lock on "GPU 0" of one node would block "GPU 0" of every other node. Being per host rather than per
run also keeps two runs on the same host from crowding one GPU.
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

__all__ = [
    "claim_gpu",
    "gpu_count",
    "jobs_per_gpu",
    "lock_dir",
    "GpuBusyError",
    "LOCK_DIR_ENV",
    "JOBS_PER_GPU",
    "JOBS_PER_GPU_ENV",
]

log = logging.getLogger("instsim.gpus")

#: environment variable naming the folder of the per-GPU lock files
LOCK_DIR_ENV = "INSTSIM_GPU_LOCK_DIR"
#: GPU jobs that share one GPU at most, by default. Three gpu.yaml jobs (NeRF training, detector training,
#: the Neural-Sim loop) ran side by side on one 80 GB H100 (benchmarks/results/pipeline_gpu_stages.json) and
#: a single one leaves most of the card idle (its steps are bound by the host). profiles/default writes the
#: same number out (tests/test_gpus.py checks that they agree).
JOBS_PER_GPU = 3
#: environment variable overriding :data:`JOBS_PER_GPU` (read by profiles/default too)
JOBS_PER_GPU_ENV = "INSTSIM_JOBS_PER_GPU"


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


def jobs_per_gpu() -> int:
    """GPU jobs one GPU takes at once: ``$INSTSIM_JOBS_PER_GPU``, else :data:`JOBS_PER_GPU`."""
    text = os.environ.get(JOBS_PER_GPU_ENV, "").strip()
    if not text:
        return JOBS_PER_GPU
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise InstsimError(f"environment variable {JOBS_PER_GPU_ENV}={text!r}: must be a whole number >= 1")
    return n


def lock_dir() -> Path:
    """The folder of the per-GPU lock files: ``$INSTSIM_GPU_LOCK_DIR``, else a per-user temporary folder."""
    env = os.environ.get(LOCK_DIR_ENV)
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"instsim-gpu-locks-{os.getuid()}"


def _cuda_started() -> bool:
    torch = sys.modules.get("torch")  # never import torch here only to ask
    return torch is not None and torch.cuda.is_initialized()


def _try_lock(path: Path, note: bool = True) -> int | None:
    """An open descriptor holding an exclusive flock on ``path``, or None if another open file holds it.
    ``note``: write this process's id into the file (for a person looking at the folder)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if note:
        # Who holds it, for a person looking at the folder; the lock itself is the flock, not this text.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _held(path: Path) -> bool:
    """Whether another open file holds the flock on ``path`` (probed without keeping it)."""
    fd = _try_lock(path, note=False)
    if fd is None:
        return True
    os.close(fd)
    return False


def _slot_file(folder: Path, device: str, slot: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in device)  # a UUID or MIG name too
    return folder / f"gpu{safe}.slot{slot}.lock"


def _take_slot(folder: Path, devices: list[str], per_gpu: int) -> tuple[int, int, int] | None:
    """Under ``claim.lock``: count the held slots of every GPU, lock a free slot on the GPU with the fewest
    (first in ``devices`` on ties). Returns ``(position in devices, slot, descriptor)``, or None when every
    slot is held."""
    mutex = os.open(folder / "claim.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(mutex, fcntl.LOCK_EX)  # held for a few file operations only
        load = []
        for gpu, device in enumerate(devices):
            held = [_held(_slot_file(folder, device, slot)) for slot in range(per_gpu)]
            if not all(held):
                load.append((sum(held), gpu, held.index(False)))
        for _, gpu, slot in sorted(load):
            fd = _try_lock(_slot_file(folder, devices[gpu], slot))
            if fd is not None:
                return gpu, slot, fd
        return None
    finally:
        os.close(mutex)  # releases claim.lock


@contextlib.contextmanager
def claim_gpu(
    directory: str | Path | None = None, poll_s: float = 1.0, timeout_s: float | None = None
) -> Iterator[int | str | None]:
    """Claim a slot on the least-loaded GPU of this host for the ``with`` block and make that GPU the only
    one CUDA sees.

    Yields the claimed GPU index (which ``CUDA_VISIBLE_DEVICES`` is set to), or None when nothing was done:
    ``CUDA_VISIBLE_DEVICES`` was already set to one device (kept as it is) or the host has no GPU. Where it
    lists several (set by hand), the claim is among those, and the claimed entry (a string) is yielded. Each GPU has
    :func:`jobs_per_gpu` slots; when every slot of every GPU is claimed, waits (polling every ``poll_s``
    seconds), at most ``timeout_s`` seconds if given, then raises :class:`GpuBusyError`. On exit the lock is
    released and ``CUDA_VISIBLE_DEVICES`` is as it was before. Must be entered before CUDA starts in this process
    (RuntimeError otherwise)."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    listed = [d.strip() for d in before.split(",") if d.strip()] if before is not None else None
    if listed is not None and len(listed) < 2:
        log.info("GPU already chosen: CUDA_VISIBLE_DEVICES=%r", before)
        yield None
        return
    # several listed by hand: claim among those (by their names); none listed: every GPU of the host
    devices = listed if listed is not None else [str(i) for i in range(gpu_count())]
    n = len(devices)
    if n == 0:
        yield None
        return
    if _cuda_started():
        raise RuntimeError("claim_gpu() must run before CUDA is used in this process: the device is fixed now")
    per_gpu = jobs_per_gpu()
    folder = Path(directory) if directory is not None else lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    waited_note = False
    while True:
        got = _take_slot(folder, devices, per_gpu)
        if got is not None:
            index, slot, fd = got
            waited = time.monotonic() - start
            os.environ["CUDA_VISIBLE_DEVICES"] = devices[index]
            log.info(
                "claimed GPU %s of %d (slot %d of %d; CUDA_VISIBLE_DEVICES=%s, lock %s; waited %.1f s)",
                devices[index], n, slot, per_gpu, devices[index], folder, waited,
            )
            try:
                yield index if listed is None else devices[index]
            finally:
                if before is None:
                    del os.environ["CUDA_VISIBLE_DEVICES"]
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = before
                os.close(fd)  # closing the only descriptor releases the flock
                log.info("released GPU %s (slot %d)", devices[index], slot)
            return
        waited = time.monotonic() - start
        if timeout_s is not None and waited >= timeout_s:
            raise GpuBusyError(
                f"all {n} GPUs stayed claimed ({per_gpu} jobs each) for {waited:.0f} s (locks in {folder})"
            )
        if not waited_note:
            log.info("all %d GPUs are claimed by other jobs (%d each; locks in %s): waiting for one", n, per_gpu, folder)
            waited_note = True
        time.sleep(poll_s)
