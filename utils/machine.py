"""The machine a training runs on: its usable cores, its device, the precision that device computes fastest.

A leaf of the package (it imports torch and utils.config's constants only), so that the training loop, the Dask
runner, the phantom renderer and the benchmark all size themselves the same way without importing each other.

* Cores: the process's affinity mask (taskset, a container's or Slurm's cpuset), not `os.cpu_count()`.
* Device: `auto` is cuda when a GPU is visible, else cpu; `check_device` refuses a GPU that is not there before
  anything runs.
* Precision (`TrainConfig.amp_dtype`): `auto` is bf16 autocast where the GPU computes bf16 (compute capability >= 8:
  A100, H100, RTX 30xx on; ROCm), fp16 with torch's GradScaler before that (T4, V100, P100: Kaggle's GPUs, where
  torch would emulate bf16, slower than fp32); on the CPU fp32, or bf16 with `cpu_bf16` where the CPU computes it
  (AVX-512 BF16 or AMX).
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from utils.config import ConfigError

if TYPE_CHECKING:  # type hints only: config imports nothing of this module
    from utils.config import TrainConfig


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (taskset, a container's or Slurm's cpuset), which
    os.cpu_count() ignores: in a 4-CPU job on a 64-core node that would start 16x too many threads and workers."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when a GPU is visible, else cpu; other values as given (cpu, cuda, cuda:N)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(device: str, where: str = "device", one_gpu_per_job: bool = False) -> None:
    """Refuse a device this machine does not have (before anything runs), naming the setting and the way out;
    `one_gpu_per_job`: the local cluster's jobs each see one GPU, as cuda (cuda:N with N >= 1 cannot exist there)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"{where}={device!r}: use auto, cpu, cuda or cuda:N", key="device")
    if not device.startswith("cuda"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if one_gpu_per_job and index >= 1 and count:
        raise ConfigError(f"{where}={device!r}: each local training job sees only its own GPU, as cuda (the jobs are "
                          "spread over every GPU: --jobs-per-gpu); use device cuda or auto", key="device")
    if index >= count:
        seen = f"{count} GPU(s) visible" if count else "no GPU is visible (torch.cuda.is_available() is False)"
        raise ConfigError(f"{where}={device!r}: {seen} on this machine; use device auto or cpu here, or send the "
                          "trainings to GPU workers with --scheduler", key="device")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first value of each key of /proc/cpuinfo (x86 Linux); empty where there is none."""
    info: dict[str, str] = {}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    for line in lines:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC", as the benchmarks record it."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic that oneDNN uses (AVX-512 BF16 or AMX); False where it cannot tell."""
    flags = set(_cpuinfo().get("flags", "").split())
    return torch.backends.mkldnn.is_available() and bool(flags & {"avx512_bf16", "amx_bf16"})


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training and inference on `device`, None for float32 (TrainConfig.amp_dtype)."""
    if not cfg.amp:
        return None
    if cfg.amp_dtype != "auto":
        return getattr(torch, cfg.amp_dtype)
    if device.type != "cuda":  # bf16 on a CPU without it in hardware is emulated: slower than fp32
        return torch.bfloat16 if cfg.cpu_bf16 and cpu_computes_bf16() else None
    # Before compute capability 8 (T4, V100, P100) torch emulates bf16: slower than fp32, while fp16 runs on the
    # tensor cores of T4 and V100. ROCm GPUs compute bf16.
    native_bf16 = torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8
    return torch.bfloat16 if native_bf16 else torch.float16


def autocast_context(cfg: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """Autocast to `amp_dtype` when it is not float32; a no-op context otherwise."""
    dtype = amp_dtype(cfg, device)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def grad_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 training needs loss scaling (fp16 ends at 65504 and small gradients underflow); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if amp_dtype(cfg, device) == torch.float16 else None


def prepare_device(device: torch.device) -> None:
    """Process-wide speed settings for training on `device`."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        # Denormal floats (weights/activations decaying towards 0) run ~10x slower on x86 CPUs: measured 9 vs
        # 152 img/s for the same resnet18 epoch. Flushing them to zero changes no result that matters.
        torch.set_flush_denormal(True)
