"""Reading state dicts from files, for the scorers' backbones and the models alike."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["read_state_dict"]


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` or ``torch.save`` file: bare, or a training checkpoint holding it under
    ``"model"`` or ``"state_dict"``; the prefixes of DDP (``module.``) and torch.compile (``_orig_mod.``) are
    removed.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a PyTorch file, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            raise ValueError(f"{path} is not a PyTorch state dict: {error}") from error
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"{path} holds no state dict: it must hold a state dict {{name: Tensor}}, possibly as "
                         f"{{'state_dict': ...}} or {{'model': ...}}; got {type(state).__name__}")
    return {key.removeprefix("module.").removeprefix("_orig_mod."): value for key, value in state.items()}
