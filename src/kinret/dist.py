"""Devices and processes: the device a run asks for, bfloat16 autocast where the hardware has it, and
torch.distributed as torchrun starts it (this process's rank and world size, and one start-up for every command that
runs under ``torchrun --nproc_per_node N``: NCCL with one GPU a process, else gloo on the CPU)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as tdist

from kinret.errors import KinretInputError


def env_rank_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group when one is running (under torchrun), else (0, 1)."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def local_device(cuda: bool) -> torch.device:
    """This process's device: its GPU under torchrun (LOCAL_RANK) when `cuda`, else the CPU."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")


@contextlib.contextmanager
def process_group(cuda: bool) -> Iterator[tuple[int, int]]:
    """Join torchrun's process group when there is more than one process (NCCL on this process's GPU when `cuda`,
    else gloo), yield (rank, world), and leave the group on the way out. A plain process yields (0, 1)."""
    rank, world = env_rank_world()
    started = False
    if world > 1 and not tdist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_device(True))
        tdist.init_process_group("nccl" if cuda else "gloo")
        started = True
    try:
        yield rank, world
    finally:
        if started and tdist.is_initialized():
            tdist.destroy_process_group()


def resolve_device(device: str) -> torch.device:
    """This process's device for a run asking for `device` (auto | cpu | cuda): auto takes a GPU when there is one."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise KinretInputError(None, "device=cuda requested but no CUDA device is available")
        return local_device(True)
    return local_device(False)


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): elsewhere bf16 autocast is emulated and
    slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, amp: bool, cpu: bool = False):
    """bfloat16 autocast on CUDA when `amp`; on the CPU only when `cpu` (config `amp_cpu`) is asked for too and the
    CPU has native bf16, since results then depend on the CPU; otherwise float32."""
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and amp and cpu and cpu_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
