"""Reading state dicts from files, for the scorers' backbones and the models alike, and saying clearly why a file
cannot be read or does not fit a model."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["read_state_dict", "read_torch_file", "explain_mismatch"]

# The names timm gives classifiers (a ViT's head, ResNet's fc, EfficientNet's classifier...): the key of a weight
# whose first dimension is the number of classes.
_CLASSIFIERS = ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def read_torch_file(path: str | os.PathLike, what: str | None = None) -> object:
    """The object in a ``torch.save`` file, read on the CPU with ``weights_only=True`` (tensors, numbers, strings
    and containers of them: no code runs).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read as one: ``"cannot read PATH: REASON"`` (``"PATH is not WHAT: REASON"``
            with ``what``), the reason being: empty, truncated (a zip archive cut short, as by an interrupted
            copy), not written by ``torch.save``, or holding objects other than weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    # torch.load fails in many ways on a file it cannot read: EOFError (empty), OSError (a truncated zip),
    # UnpicklingError, KeyError or RuntimeError (other bytes, a truncated legacy file)...
    except Exception as error:
        reason = _why_unreadable(path, error)
        raise ValueError(f"{path} is not {what}: {reason}" if what else f"cannot read {path}: {reason}") from error


def _why_unreadable(path: Path, error: Exception) -> str:
    with open(path, "rb") as file:
        head = file.read(4)
    if not head:
        return "the file is empty"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # The first sentence of torch's message, unless it is weights-only loading's boilerplate, about another case.
    detail = lines[0].split(". ")[0].rstrip(".") if lines and not lines[0].startswith("Weights only") else ""
    for line in lines:
        if "Unsupported global" in line:
            # Weights-only loading refuses pickled objects (a whole model, custom classes): weights must be saved
            # as a state dict.
            name = line[line.index("Unsupported global"):].split(" was not an allowed global")[0]
            return f"it holds objects other than weights ({name}); save model.state_dict() instead"
    if head == b"PK\x03\x04":  # torch.save's zip archive, whose index is at its end
        return f"truncated or corrupt (a torch.save archive that cannot be opened: {detail or type(error).__name__})"
    return f"not a file written by torch.save ({type(error).__name__}: {detail})" if detail else \
        f"not a file written by torch.save ({type(error).__name__})"


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` or ``torch.save`` file: bare, or a training checkpoint holding it under
    ``"model"`` or ``"state_dict"``; the prefixes of DDP (``module.``) and torch.compile (``_orig_mod.``) are
    removed.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read (empty, truncated, not a PyTorch or safetensors file), or holds no
            state dict; the message names the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except MemoryError:
            raise
        except Exception as error:  # safetensors' own SafetensorError, or an OSError
            reason = "the file is empty" if path.stat().st_size == 0 else f"not a complete safetensors file ({error})"
            raise ValueError(f"{path} is not a PyTorch state dict: {reason}") from error
    else:
        state = read_torch_file(path, what="a PyTorch state dict")
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"{path} holds no state dict: it must hold a state dict {{name: Tensor}}, possibly as "
                         f"{{'state_dict': ...}} or {{'model': ...}}; got {type(state).__name__}")
    return {key.removeprefix("module.").removeprefix("_orig_mod."): value for key, value in state.items()}


def explain_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], *, keys: bool = True) -> str | None:
    """Why the weights ``found`` (a state dict being loaded) do not fit a model whose state dict is ``expected``;
    None when they do.

    It names the configuration that differs where the weights tell it: the number of classes (``num_classes``),
    the embedding width (``embed_dim``), the number of blocks (``depth``), the position table's length (the image
    size or the patch size: ``img_size``), learned xy position tables (``pos_embed``); then the weights that
    differ, a few of each kind. With ``keys=False`` only shapes are compared (names missing on either side are
    allowed).
    """
    differ = [key for key in expected if key in found and tuple(found[key].shape) != tuple(expected[key].shape)]
    missing = [key for key in expected if key not in found] if keys else []
    unexpected = [key for key in found if key not in expected] if keys else []
    if not (differ or missing or unexpected):
        return None
    hints = []

    def shapes(*names: str) -> tuple[tuple, tuple] | None:
        """(the loaded shape, the model's) of the first differing weight called one of ``names``, under any prefix."""
        for key in differ:
            if any(key == name or key.endswith("." + name) for name in names):
                return tuple(found[key].shape), tuple(expected[key].shape)
        return None

    classifier = shapes(*_CLASSIFIERS)
    if classifier and classifier[0][0] != classifier[1][0]:
        hints.append(f"num_classes: {classifier[0][0]} in the weights, {classifier[1][0]} in the model")
    width = shapes("cls_token", "patch_embed.proj.weight")
    if width:
        index = -1 if len(width[0]) == 3 else 0  # cls_token [1, 1, D]; the patch embedding [D, C, p, p]
        if width[0][index] != width[1][index]:
            hints.append(f"embed_dim: {width[0][index]} in the weights, {width[1][index]} in the model")
    depths = [1 + max((int(match.group(1)) for key in weights for match in [_BLOCK.search(key)] if match),
                      default=-1) for weights in (found, expected)]
    if keys and depths[0] != depths[1]:
        hints.append(f"depth: {depths[0]} block{'s' * (depths[0] != 1)} in the weights, {depths[1]} in the model")
    table = shapes("pos_embed")
    if table and len(table[0]) == 3 and table[0][-1] == table[1][-1]:
        hints.append(f"img_size (or the patch size): a position table of {table[0][1]} entries in the weights, "
                     f"{table[1][1]} in the model")
    xy_found, xy_expected = (any(".xy_embed." in f".{key}" for key in weights) for weights in (found, expected))
    if keys and xy_found != xy_expected:
        hints.append("pos_embed: the weights have learned xy position tables, which the model does not use" if xy_found
                     else "pos_embed: the model's 'xy-learned' needs learned xy position tables, which the weights "
                          "lack")

    def some(names: list[str], describe) -> str:
        shown = ", ".join(describe(name) for name in names[:3])
        return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    details = []
    if differ:
        details.append("shapes differ: " + some(differ, lambda key: f"{key} {list(found[key].shape)} loaded, "
                                                                   f"{list(expected[key].shape)} in the model"))
    if missing:
        details.append(f"missing: {some(missing, str)}")
    if unexpected:
        details.append(f"not in the model: {some(unexpected, str)}")
    what = f"they are of another configuration ({'; '.join(hints)})" if hints else "they do not fit"
    return f"{what}: {'; '.join(details)}"
