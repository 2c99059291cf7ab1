"""Each epoch's random numbers, a function of (seed, epoch, rank) alone, so that a resumed run draws the same."""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_epoch"]


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seeds every generator that augmentations, dropout or a random scorer may draw from, per (seed, epoch,
    rank): an epoch's random numbers do not depend on the epochs before it, so a resumed run draws the same."""
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[0]))
