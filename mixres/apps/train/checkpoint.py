"""The checkpoints of ``python -m mixres.train`` (``last.pt``, ``best.pt``): writing one whole, reading one back
checked, and whether this run's options may resume it."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from ...checkpoints import read_torch_file

__all__ = ["CHECKPOINT_KEYS", "RESUME_MODEL_OPTIONS", "save_checkpoint", "read_checkpoint", "check_resumable"]

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_top1", "metrics", "args")
# The options that make another model than the checkpoint's, which a resumed run must keep (its weights and the
# optimizer's moments are that model's), beside --model and the number of classes.
RESUME_MODEL_OPTIONS = ("model_kwargs", "img_size", "pos_embed", "min_patch_size", "max_patch_size", "uniform_grid")
# timm arguments in --model-kwargs that only regularise training: a resumed run may change them.
_REGULARISERS = frozenset({"drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate",
                           "patch_drop_rate"})


def save_checkpoint(path: Path, state: dict) -> None:
    """Writes a checkpoint whole or not at all: a run killed while saving keeps the previous file."""
    partial = path.with_suffix(".tmp")
    torch.save(state, partial)
    os.replace(partial, path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint that ``python -m mixres.train`` wrote (``last.pt``, ``best.pt``), checked to be a whole one: the
    :data:`CHECKPOINT_KEYS`, each of its kind.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read (empty, truncated...: :func:`mixres.checkpoints.read_torch_file`), or
            is no such checkpoint (a plain state dict, another program's file, keys missing); the message names
            the file and what is wrong.
    """
    state = read_torch_file(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a checkpoint of python -m mixres.train: it holds a {type(state).__name__}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        if state and all(isinstance(value, Tensor) for value in state.values()):
            raise ValueError(f"{path} is not a checkpoint of python -m mixres.train but a state dict of weights "
                             f"alone: start a new run from it with --pretrained-file {path}")
        raise ValueError(f"{path} is not a whole checkpoint of python -m mixres.train: it lacks "
                         f"{', '.join(missing)}")
    kinds = {"model": isinstance(state["model"], dict) and all(isinstance(value, Tensor)
                                                                for value in state["model"].values()),
             "optimizer": isinstance(state["optimizer"], dict) and {"state", "param_groups"} <= set(state["optimizer"]),
             "scheduler": isinstance(state["scheduler"], dict) and isinstance(state["scheduler"].get("last_epoch"),
                                                                              int),
             "scaler": isinstance(state["scaler"], dict),
             "epoch": isinstance(state["epoch"], int) and state["epoch"] >= 1,
             "best_top1": isinstance(state["best_top1"], (int, float)),
             "metrics": isinstance(state["metrics"], dict),
             "args": isinstance(state["args"], dict) and isinstance(state["args"].get("model"), str)}
    wrong = [key for key, right in kinds.items() if not right]
    if wrong:
        raise ValueError(f"{path} is not a whole checkpoint of python -m mixres.train: its {', '.join(wrong)} "
                         f"{'is' if len(wrong) == 1 else 'are'} not what this script writes")
    return state


def check_resumable(parser: argparse.ArgumentParser, args: argparse.Namespace, checkpoint: dict) -> None:
    """A usage error where this run's options make another model than the checkpoint's (see
    :mod:`mixres.apps.train.options`' docstring): it names the option, the checkpoint's value and this run's."""
    saved = checkpoint["args"]
    if saved["model"] != args.model:
        parser.error(f"--resume {args.resume} holds a {saved['model']}, not a {args.model}")

    def value(options: dict | argparse.Namespace, name: str):
        found = options.get(name, parser.get_default(name)) if isinstance(options, dict) else getattr(options, name)
        if name == "model_kwargs":
            return {key: item for key, item in (found or {}).items() if key not in _REGULARISERS}
        return found

    def show(name: str, found) -> str:
        if isinstance(found, bool):
            return "given" if found else "not given"
        return "not given" if found is None else json.dumps(found) if isinstance(found, dict) else str(found)

    for name in RESUME_MODEL_OPTIONS:
        before, now = value(saved, name), value(args, name)
        if before != now:
            option = f"--{name.replace('_', '-')}"
            parser.error(f"--resume {args.resume}: {option} is {show(name, before)} in the checkpoint and "
                         f"{show(name, now)} in this run; a resumed run continues the checkpoint's model: give "
                         f"its {option}, or start a new run from its weights with --pretrained-file {args.resume}")
