"""Time torch-ngp (github.com/ashawkey/torch-ngp; a speed peer, not part of instsim and not in this repository)
on a BlenderNeRF folder, as its README trains NeRF-synthetic scenes (``main_nerf.py DATA -O --bound 1.0
--scale 0.8 --dt_gamma 0``: fp16, CUDA ray marching, 4096 rays per step), so ``bench_nerf_train.py``'s
4096-rays runs have a same-machine, same-call reference.

    python benchmarks/bench_torch_ngp.py --ngp DIR_OF_TORCH_NGP --data build/bench/blendernerf128 --iters 3000 \\
        --out $OUT/torch_ngp.json

torch-ngp runs unmodified through its own ``main_nerf.py`` (``runpy``), except that: modules it imports only
for logging, meshes, LPIPS and its GUI (tensorboardX, trimesh, mcubes, lpips, dearpygui) are replaced by inert
stand-ins when they are not installed; its final video and mesh export are skipped; and each training epoch
is timed (CUDA-synchronised) so its iterations per second can be given without its per-epoch checkpoint saves
(``iterations_per_s``) and with them (``iterations_per_s_with_saves``). Its test PSNR (white background) is
its own evaluation after training (its PSNR meter, the mean over test views of each view's PSNR, as
``bench_nerf_train.py`` reports it), with EMA weights as its ``main_nerf.py`` trains. The folder needs ``transforms_train.json`` and ``transforms_test.json``;
torch-ngp also reads a validation split, for which the test split is linked.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

_OPTIONAL = ("tensorboardX", "trimesh", "mcubes", "lpips", "dearpygui", "dearpygui.dearpygui")


class _Inert:
    """Stands in for any attribute, call or class of a module torch-ngp needs only for logging or meshes."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name):
        return _Inert()

    def __call__(self, *args, **kwargs):
        return torch.zeros(1, device="cuda")

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self


def _inert_attr(attr: str):
    if attr.startswith("__"):  # module machinery (__path__, __spec__, ...) must stay absent
        raise AttributeError(attr)
    return _Inert


def _stub_missing() -> list[str]:
    stubbed = []
    for name in _OPTIONAL:
        if name in sys.modules:
            continue
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.__getattr__ = _inert_attr  # type: ignore[attr-defined]
            sys.modules[name] = mod
            stubbed.append(name)
            parent, _, child = name.rpartition(".")
            if parent in sys.modules:
                setattr(sys.modules[parent], child, mod)
    return stubbed


def _dataset_with_val(data: Path, work: Path) -> Path:
    """A folder of links to ``data`` that also has ``transforms_val.json`` (= the test split)."""
    out = work / "data"
    out.mkdir(parents=True, exist_ok=True)
    for p in data.iterdir():
        if not (out / p.name).exists():
            os.symlink(p.resolve(), out / p.name)
    if not (out / "transforms_val.json").exists():
        os.symlink((data / "transforms_test.json").resolve(), out / "transforms_val.json")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ngp", type=Path, required=True, help="a torch-ngp checkout (its extensions build at import)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    ngp = args.ngp.resolve()
    sys.path.insert(0, str(ngp))
    stubbed = _stub_missing()
    work = Path(tempfile.mkdtemp(prefix="torch_ngp_"))
    data = _dataset_with_val(args.data.resolve(), work)
    import nerf.utils as ngp_utils  # noqa: E402  (torch-ngp's)

    epochs: list[dict] = []
    real_epoch = ngp_utils.Trainer.train_one_epoch

    def timed_epoch(self, loader):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        real_epoch(self, loader)
        torch.cuda.synchronize()
        epochs.append({"steps": len(loader), "s": time.perf_counter() - t0, "end": time.perf_counter()})

    ngp_utils.Trainer.train_one_epoch = timed_epoch
    # its PSNR meter is cleared right after it reports (and stats["results"] holds the MSE loss, its first
    # metric by default), so the reported value is kept here
    psnrs: list[float] = []
    real_measure = ngp_utils.PSNRMeter.measure

    def kept_measure(self):
        value = real_measure(self)
        psnrs.append(float(value))
        return value

    ngp_utils.PSNRMeter.measure = kept_measure
    ngp_utils.Trainer.test = lambda self, *a, **k: None  # video export: needs imageio-ffmpeg, not timed anyway
    ngp_utils.Trainer.save_mesh = lambda self, *a, **k: None
    cmd = ["main_nerf.py", str(data), "--workspace", str(work / "ws"), "-O", "--iters", str(args.iters),
           "--bound", "1.0", "--scale", "0.8", "--dt_gamma", "0"]
    sys.argv = cmd
    torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    glb = runpy.run_path(str(ngp / "main_nerf.py"), run_name="__main__")
    trainer = glb["trainer"]
    steps = sum(e["steps"] for e in epochs)
    train_s = sum(e["s"] for e in epochs)
    first_start = epochs[0]["end"] - epochs[0]["s"]
    report = {
        "benchmark": "torch_ngp_peer",
        "device_name": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join(cmd[:1] + ["DATA"] + cmd[2:]),
        "data": str(args.data),
        "stubbed_modules": stubbed,
        "iterations": steps,
        "epochs": len(epochs),
        "train_time_s": train_s,
        "iterations_per_s": steps / train_s,
        "iterations_per_s_median_epoch": statistics.median(e["steps"] / e["s"] for e in epochs),
        "iterations_per_s_with_saves": steps / (epochs[-1]["end"] - first_start),
        "test_psnr_white": psnrs[-1] if psnrs else None,  # its PSNRMeter: mean over test views of per-view PSNR
        "test_mse_white": float(trainer.stats["results"][-1]) if trainer.stats["results"] else None,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
        "wall_s": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[torch-ngp] {steps} its in {train_s:.1f} s: {report['iterations_per_s']:.1f} it/s "
          f"({report['iterations_per_s_with_saves']:.1f} with its saves), test PSNR {report['test_psnr_white']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
