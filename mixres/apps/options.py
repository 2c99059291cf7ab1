"""The command-line options that ``python -m mixres.train``, ``python -m mixres.evaluate``, ``python -m mixres.demo``
and ``mixres`` share: the model options and their checks (the model itself: :mod:`mixres.apps.model_builder`),
JSON-object arguments, ``--amp`` and its autocast, and numeric option types that declare their range once
(:class:`Integer`, :class:`Real`, :class:`IntegerList`), so that any number out of range is a usage error naming
the option and the range."""
from __future__ import annotations

import argparse
import json
import math
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from ..pyramid import MAX_IMAGE_SIDE
from ..scorers import SCORERS
from .loaders import MAX_SEED

__all__ = ["HelpFormatter", "add_model_options", "check_model_options", "add_device_option", "usable_device",
           "add_workers_option", "add_seed_option", "add_data_kwargs_option", "add_amp_option", "autocast",
           "json_object", "require_file", "Threshold", "add_threshold_option", "add_adaptive_options",
           "check_adaptive_options", "format_threshold", "QUADFORMER_OPTIONS", "AMP_DTYPES", "COMMAND_LINE_SCORERS",
           "Integer", "Real", "IntegerList", "INDEX_MAX", "SIDE_MAX", "SEED_MAX", "SIDE", "COUNT", "POSITIVE"]

# The options that configure a Quadformer, each named as the Quadformer argument it sets.
QUADFORMER_OPTIONS = ("n_patches", "scorer", "scorer_kwargs", "pos_embed", "min_patch_size", "max_patch_size")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# GradCAM needs a classifier and Precomputed a saliency map: neither can be given on the command line.
COMMAND_LINE_SCORERS = tuple(name for name in SCORERS if name not in ("gradcam", "precomputed"))


# The largest count an option takes: torch's tensors and Python's len() index with signed 64-bit integers.
INDEX_MAX = 2 ** 63 - 1
# The largest image side or patch size: the tokenizer's (its boxes (y, x, size) are int32).
SIDE_MAX = MAX_IMAGE_SIDE
# The largest seed: mixres.apps.loaders', which leaves room for the seeds derived from it (seed + epoch, seed + 1).
SEED_MAX = MAX_SEED


def _number(value: float) -> str:
    """``value`` for a message: ``2**63 - 1`` rather than its 19 digits."""
    if isinstance(value, int) and value >= 2 ** 16 and (value + 1) & value == 0:
        return f"2**{value.bit_length()} - 1"
    return str(value)


def _quoted(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


class Integer:
    """An argparse type: an integer from ``minimum`` to ``maximum``; anything else (not an integer, out of range)
    is a usage error that names the option (argparse adds it) and the range:
    ``argument --batch: expected an integer from 1 to 2**63 - 1, got '0'``."""

    def __init__(self, minimum: int, maximum: int = INDEX_MAX):
        self.minimum, self.maximum = minimum, maximum

    def describe(self) -> str:
        return f"an integer from {_number(self.minimum)} to {_number(self.maximum)}"

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # not an integer, or more digits than Python converts
            value = None
        if value is None or not self.minimum <= value <= self.maximum:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {_quoted(text)}")
        return value

    def __repr__(self) -> str:  # argparse names the type by it in some messages
        return f"Integer({self.minimum}, {self.maximum})"


class IntegerList(Integer):
    """An argparse type: comma-separated integers (``49,64,100``), each from ``minimum`` to ``maximum`` ->
    their list; at least one."""

    def describe(self) -> str:
        return f"comma-separated integers such as 49,64,100, each from {_number(self.minimum)} to " \
               f"{_number(self.maximum)}"

    def __call__(self, text: str) -> list[int]:
        parts = [part.strip() for part in text.split(",")]
        try:
            if not any(parts) or not all(parts):  # empty, or an empty item: "49,,64", "49,"
                raise argparse.ArgumentTypeError("")
            return [super(IntegerList, self).__call__(part) for part in parts]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {_quoted(text)}") from None


class Real:
    """An argparse type: a finite number above ``minimum`` (or from it, with ``inclusive``) and at most
    ``maximum``; NaN, infinities ("nan", "inf" parse as floats), out-of-range values and anything else are usage
    errors that name the option and the range."""

    def __init__(self, minimum: float = 0.0, maximum: float = math.inf, *, inclusive: bool = True):
        self.minimum, self.maximum, self.inclusive = minimum, maximum, inclusive

    def describe(self) -> str:
        lower = f"at least {self.minimum:g}" if self.inclusive else f"above {self.minimum:g}"
        upper = f" and at most {self.maximum:g}" if self.maximum < math.inf else ""
        return f"a finite number {lower}{upper}"

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = value >= self.minimum if self.inclusive else value > self.minimum
        if not (math.isfinite(value) and above and value <= self.maximum):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {_quoted(text)}")
        return value

    def __repr__(self) -> str:
        return f"Real({self.minimum}, {self.maximum}, inclusive={self.inclusive})"


class Threshold:
    """An argparse type: the stopping threshold of adaptive budgets (:func:`mixres.tokenize`'s ``threshold``), one
    finite number for every patch size (``0.05``) or one per size (``64=0.05,32=0.02``) -> a float or
    ``{size: float}``. NaN, infinities and malformed text are usage errors naming the option; which sizes a dict
    must hold depends on the image, so that is checked where the geometry is known."""

    def describe(self) -> str:
        return "a finite number (0.05), or one per patch size (64=0.05,32=0.02)"

    def __call__(self, text: str) -> float | dict[int, float]:
        try:
            if "=" not in text:
                return self._finite(text)
            values = {}
            for item in text.split(","):
                size, _, value = item.partition("=")
                size = int(size)
                if size < 1 or size in values:
                    raise ValueError
                values[size] = self._finite(value)
            return values
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {_quoted(text)}") from None

    @staticmethod
    def _finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError
        return value

    def __repr__(self) -> str:
        return "Threshold()"


def format_threshold(threshold: float | dict[int, float]) -> str:
    """A threshold as ``--threshold`` takes it, every digit kept (``repr``), so that it can be given back."""
    if isinstance(threshold, dict):
        return ",".join(f"{size}={value!r}" for size, value in threshold.items())
    return repr(float(threshold))


# The ranges most options share.
POSITIVE = Integer(1)            # counts of images, batches, epochs, budgets...
COUNT = Integer(0)               # counts that may be zero: warm-up calls
SIDE = Integer(1, SIDE_MAX)      # image sides and patch sizes, in pixels


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already states one or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def json_object(text: str) -> dict:
    """An argparse type: a JSON object (``'{"depth": 6}'``) -> a dict; anything else is a usage error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return value


def add_model_options(parser: argparse.ArgumentParser, *, quadformer_only: bool = False,
                      num_classes_default: str = "timm's"):
    """Adds the "model" and "Quadformer" option groups: ``--model``, its starting weights and timm arguments, and
    the Quadformer's. With ``quadformer_only``, the model is always a Quadformer (``--model`` is a ViT's name, the
    ``quadformer_`` prefix optional) and ``--n-patches`` is left out: the caller sets the budget per call.
    Returns the "model" group, for a caller's own options."""
    from ..models import POS_EMBEDS

    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help="a timm ViT name, with or without the quadformer_ prefix (quadformer_vit_base_patch16_224)"
                       if quadformer_only else "a timm model name; quadformer_<timm ViT name> is a Quadformer on "
                                               "that ViT (e.g. quadformer_vit_small_patch16_224)")
    model.add_argument("--pretrained", action="store_true",
                       help="start from timm's pretrained weights (for a Quadformer, its ViT's; downloaded, or "
                            "timm's cache)")
    model.add_argument("--pretrained-file", type=Path, default=None,
                       help="start from a local state dict instead (.pth or .safetensors): a plain timm model's (a "
                            "ViT's for a Quadformer), a Quadformer's, or a training checkpoint holding one under "
                            "'model'. A classifier of another number of classes starts from its initialisation "
                            "(with a warning for a Quadformer)")
    model.add_argument("--num-classes", type=POSITIVE, default=None,
                       help=f"classifier outputs (default: {num_classes_default})")
    model.add_argument("--img-size", type=SIDE, default=None, help="input size (default: the model's)")
    model.add_argument("--model-kwargs", type=json_object, default={},
                       help='more timm.create_model arguments, a JSON object: \'{"depth": 6, "drop_path_rate": 0.1}\'')

    quadformer = parser.add_argument_group("Quadformer" if quadformer_only else
                                           "Quadformer (quadformer_* models only; default: the model's)")
    if not quadformer_only:
        quadformer.add_argument("--n-patches", type=POSITIVE, default=None,
                                help="leaves per image (default: about half the uniform grid's tokens: 100 at "
                                     "224 px, 288 at 384 px)")
        quadformer.add_argument("--uniform-grid", action="store_true",
                                help="the uniform-grid baseline instead, at the same budget: the ViT on the images "
                                     "resized to the grid of about --n-patches tokens (mixres.models.UniformGrid)")
    quadformer.add_argument("--scorer", default=None, choices=COMMAND_LINE_SCORERS,
                            help="the leaves' scorer (default: pixel-blur)")
    quadformer.add_argument("--scorer-kwargs", type=json_object, default=None,
                            help='the scorer\'s arguments, a JSON object: \'{"weights": "shufflenet.pth"}\' for '
                                 'feature')
    quadformer.add_argument("--pos-embed", default=None, choices=POS_EMBEDS,
                            help="the leaves' position embedding (default: resample)")
    quadformer.add_argument("--min-patch-size", type=SIDE, default=None,
                            help="smallest leaf (default: the ViT's patch)")
    quadformer.add_argument("--max-patch-size", type=SIDE, default=None,
                            help="largest leaf (default: 4, 2 or 1 times the smallest, the first that divides the "
                                 "image)")
    return model


def check_model_options(parser: argparse.ArgumentParser, args: argparse.Namespace, *,
                        quadformer_only: bool = False) -> None:
    """Exits with a usage error (status 2) for an unknown model, Quadformer options for another model, the image
    size given twice or a missing ``--pretrained-file``. With ``quadformer_only``, a bare ViT name in
    ``args.model`` gets its ``quadformer_`` prefix; ``args.quadformer`` says whether the model is a Quadformer."""
    import timm

    from ..models.factory import QUADFORMER_PREFIX

    if quadformer_only and not args.model.startswith(QUADFORMER_PREFIX):
        args.model = QUADFORMER_PREFIX + args.model
    args.quadformer = args.model.startswith(QUADFORMER_PREFIX)
    if not timm.is_model(args.model.removeprefix(QUADFORMER_PREFIX)):
        parser.error(f"unknown timm model {args.model.removeprefix(QUADFORMER_PREFIX)!r}")
    given = [f"--{name.replace('_', '-')}" for name in QUADFORMER_OPTIONS if getattr(args, name, None) is not None]
    if given and not args.quadformer:
        parser.error(f"{', '.join(given)} configure a Quadformer: the model must be a quadformer_* one, "
                     f"not {args.model!r}")
    if getattr(args, "uniform_grid", False) and not args.quadformer:
        parser.error(f"--uniform-grid is the baseline of a Quadformer: the model must be a quadformer_* one, not "
                     f"{args.model!r}")
    if args.img_size is not None and "img_size" in args.model_kwargs:
        parser.error("give the image size once: --img-size or img_size in --model-kwargs")
    require_file(parser, args, "pretrained_file")


def add_threshold_option(group, note: str = "", **kwargs) -> None:
    """Adds ``--threshold`` (:class:`Threshold`), the stopping rule of adaptive budgets; ``note`` ends its help."""
    group.add_argument("--threshold", type=Threshold(), default=None, metavar="T", **kwargs,
                       help="adaptive budgets: each image stops splitting once its best leaf scores at or below T, "
                            "one number (0.05) or one per splittable patch size (64=0.05,32=0.02), with --n-patches "
                            "as the cap N_max" + note)


def add_adaptive_options(group, several: bool = False, sample: bool = True) -> None:
    """Adds ``--threshold`` and ``--mean-tokens`` (one of them; with ``several``, each takes one or more values) and,
    with ``sample``, ``--calibration-images``: the adaptive budgets of a Quadformer, ``--n-patches`` their cap."""
    exclusive = group.add_mutually_exclusive_group()
    count = dict(nargs="+") if several else {}
    add_threshold_option(exclusive, " (several: one point each)" if several else "", **count)
    exclusive.add_argument("--mean-tokens", type=Real(1), default=None, metavar="M", **count,
                           help="adaptive budgets at the threshold whose mean token count is M on a sample of the "
                                "images (mixres.calibrate_threshold), from the roots' count to the cap --n-patches"
                                + (" (several: one point each)" if several else ""))
    if sample:
        group.add_argument("--calibration-images", type=POSITIVE, default=256,
                           help="images of the sample that --mean-tokens calibrates the threshold on, spread evenly "
                                "over the data")


def check_adaptive_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error for ``--threshold`` or ``--mean-tokens`` with a model that cannot take adaptive budgets: not a
    Quadformer, or the uniform grid (one fixed grid of tokens for every image)."""
    given = "--threshold" if args.threshold is not None else "--mean-tokens" if args.mean_tokens is not None else None
    if given is None:
        return
    if getattr(args, "uniform_grid", False):
        parser.error(f"{given} gives each image its own number of tokens, which the uniform grid (--uniform-grid) "
                     f"cannot: it reads one fixed grid; leave one of them out")
    if not getattr(args, "quadformer", True):
        parser.error(f"{given} sets adaptive budgets of a Quadformer: the model must be a quadformer_* one, not "
                     f"{args.model!r}")


def usable_device(text: str) -> torch.device:
    """An argparse type: a torch device that this machine can use."""
    try:
        device = torch.device(text)
        torch.empty(0, device=device)
    # torch reports a device it cannot use in several ways: RuntimeError, AssertionError (a build without CUDA)...
    except Exception as error:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be used here: {str(error).splitlines()[0]}") from None
    return device


def add_device_option(group) -> None:
    """Adds ``--device``, checked to be usable here (:func:`usable_device`). Not for training under torchrun, where
    each process must pick its own GPU before touching any."""
    group.add_argument("--device", type=usable_device, default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device (default: cuda when there is one, else cpu)")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_workers_option(group, help: str) -> None:
    """Adds ``--workers``, defaulting to 4 data-loading processes, or fewer on a machine with fewer cores; at most
    4 per core (and at least 16 allowed): more only adds processes, and a typo such as 1000000 would try to start
    that many."""
    group.add_argument("--workers", type=Integer(0, max(16, 4 * _cores())), default=min(4, _cores()), help=help)


def add_seed_option(group, help: str = "seed of the random numbers") -> None:
    """Adds ``--seed``, from 0 to :data:`SEED_MAX`, 0 by default."""
    group.add_argument("--seed", type=Integer(0, SEED_MAX), default=0, help=help)


def add_data_kwargs_option(group) -> None:
    """Adds ``--data-kwargs``: more arguments of generated data (:class:`mixres.datasets.SmallObjects`)."""
    group.add_argument("--data-kwargs", type=json_object, default=None,
                       help='more arguments of the generated data (small-objects), a JSON object: '
                            '\'{"object_size": [20, 28]}\'')


def add_amp_option(group, note: str = "") -> None:
    """Adds ``--amp [bf16|fp16]`` (``--amp`` alone: bf16), for :func:`autocast`, to ``group`` (a parser or an
    argument group); ``note`` ends its help."""
    group.add_argument("--amp", nargs="?", const="bf16", default=None, choices=tuple(AMP_DTYPES),
                       help="mixed precision by torch.autocast: --amp alone is bf16 (CPU, recent GPUs); fp16 for "
                            "GPUs without bf16" + note)


def autocast(device: torch.device, amp: str | None) -> AbstractContextManager:
    """``torch.autocast`` on ``device`` to the dtype of an ``--amp`` value (``"bf16"``, ``"fp16"``); nothing for
    None."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp is not None else nullcontext()


def require_file(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> None:
    """A usage error when the path option ``name`` (an attribute name) is given but no file is there."""
    path = getattr(args, name)
    if path is not None and not Path(path).is_file():
        parser.error(f"--{name.replace('_', '-')} {path}: no such file")
