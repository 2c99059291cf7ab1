"""One process or several under ``torchrun`` (DDP): each process's device and process group, sums across the
processes, and the digest that tells whether their replicas of the weights are the same."""
from __future__ import annotations

import argparse
import hashlib
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["setup_device", "reduce_sum", "weights_digest"]


def setup_device(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    """(device, rank, world size). Under torchrun (WORLD_SIZE > 1) each process takes the device of its
    LOCAL_RANK and joins the process group: NCCL on CUDA, Gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device)
    if world == 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device, dist.get_rank(), world


def reduce_sum(tensor: Tensor) -> Tensor:
    """The sum over the processes (the tensor itself without DDP)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def weights_digest(model: nn.Module) -> str:
    """A SHA-256 of the model's state dict (names, dtypes, shapes and bytes): equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{name} {value.dtype} {tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d: BatchNorm's counter
    return digest.hexdigest()
