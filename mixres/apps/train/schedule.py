"""The learning-rate schedule (a linear warmup, then a per-step cosine), and where a resumed run picks it up."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_cosine", "restore_optimizer"]


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_lr_ratio: float = 0.0) -> LambdaLR:
    """A per-step schedule: the learning rate rises linearly to its base value over ``warmup_steps`` steps
    (``base * (step + 1) / warmup_steps``, never 0), then follows a half cosine down to ``base * min_lr_ratio``
    at ``total_steps``. Call ``scheduler.step()`` after every optimiser step. Its state is the step count alone,
    and the learning rate a function of it, so a resumed run follows the same curve."""
    warmup_steps = min(warmup_steps, total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def restore_optimizer(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, checkpoint: dict, step: int) -> None:
    """Loads the optimizer's state (AdamW's moments and step counts) from ``checkpoint``, keeping this run's
    hyperparameters (``--lr``, ``--weight-decay``), and puts the schedule (this run's: ``--epochs``,
    ``--warmup-epochs``, ``--min-lr``) at ``step``: the epochs done times this run's steps per epoch, which another
    batch size or number of processes changes. With nothing changed, this is the checkpoint's own step and
    learning rate, bit for bit."""
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)
    scheduler.load_state_dict(checkpoint["scheduler"])  # its counters
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler.last_epoch = step
    # What LambdaLR.step() computes at this step.
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
