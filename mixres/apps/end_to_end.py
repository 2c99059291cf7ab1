"""The whole forward of a timm ViT against the Quadformer built around a copy of it (the same weights), timed in
interleaved rounds: what ``mixres bench --end-to-end`` prints and ``benchmarks/test_end_to_end.py`` records.

Each round runs the plain ViT on its uniform grid of patches, then the scorer alone (``Quadformer.score``: the
unnormalisation and the scorer of the forward), then the Quadformer's forward, each call waiting for the device;
the times are the medians over the rounds. Interleaving makes a slow spell of a shared machine hit the three alike.
``ratio`` = ViT time / Quadformer time, which is the Quadformer's images/s over the ViT's (above 1: the Quadformer
is faster); ``scorer_share`` = scorer time / Quadformer time.
"""
from __future__ import annotations

import copy
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..models.quadformer import Quadformer
from .timing import synchronize, timed_call

__all__ = ["random_vit", "quadformer_around", "normalised_random_images", "end_to_end_calls", "run_rounds",
           "interleaved_ms", "end_to_end_row", "time_end_to_end", "format_end_to_end"]

# A runner of rounds: (before, last, rounds, warmup) -> None, calling ``before()`` then ``last()`` in each round.
RoundRunner = Callable[[Callable[[], None], Callable[[], None], int, int], None]


def random_vit(name: str, height: int, width: int, device: torch.device | str, dtype: torch.dtype,
               seed: int = 0) -> nn.Module:
    """timm's ``name`` for ``height x width`` images, with random weights drawn from ``seed`` (the global random
    state is left as it was), on ``device`` in ``dtype``, in eval mode. A ViT's cost does not depend on its
    weights. timm's errors (an unknown name, a model that takes no ``img_size``) pass through."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = timm.create_model(name, img_size=(height, width))
    return vit.to(device, dtype).eval()


def quadformer_around(vit: nn.Module, n_patches: int, scorer: str, min_patch_size: int, max_patch_size: int,
                      resize_mode: str = "area", seed: int = 0) -> Quadformer:
    """The Quadformer around a copy of ``vit``: the same weights in modules of its own, so that ``vit`` still runs
    alone. It reads the ViT's image size, ``n_patches`` leaves of ``min_patch_size`` to ``max_patch_size`` px
    resized to the ViT's patch size, with ``pos_embed="resample"``; on the ViT's device and dtype, in eval mode.

    ``scorer`` is a :func:`mixres.create_scorer` name. The ``"feature"`` scorer gets random backbone weights (its
    cost does not depend on them; its warning about them is silenced, as this is on purpose), drawn from ``seed``
    without touching the global random state, and runs under autocast to the ViT's dtype when that is a 16-bit one.
    """
    parameter = next(vit.parameters())
    scorer_kwargs = {}
    if scorer == "feature":
        scorer_kwargs["random_init"] = True
        if parameter.dtype in (torch.bfloat16, torch.float16):
            scorer_kwargs["autocast_dtype"] = parameter.dtype
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message="FeatureBased: backbone", category=UserWarning)
        torch.manual_seed(seed)
        model = Quadformer(copy.deepcopy(vit), n_patches=n_patches, scorer=scorer, min_patch_size=min_patch_size,
                           max_patch_size=max_patch_size, pos_embed="resample", resize_mode=resize_mode,
                           scorer_kwargs=scorer_kwargs)
    return model.to(parameter.device, parameter.dtype).eval()


def normalised_random_images(vit: nn.Module, batch: int, height: int, width: int, seed: int = 0) -> Tensor:
    """``[batch, 3, height, width]`` uniform random [0, 1] images drawn from ``seed``, normalised with the ViT's
    ``pretrained_cfg`` mean and std (as its inputs are), on its device in its dtype."""
    parameter = next(vit.parameters())
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=generator)
    mean = torch.tensor(vit.pretrained_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(vit.pretrained_cfg["std"]).view(3, 1, 1)
    return ((images - mean) / std).to(parameter.device, parameter.dtype)


def end_to_end_calls(vit: nn.Module, model: Quadformer, images: Tensor) -> dict[str, Callable[[], object]]:
    """The three calls of a round, in their order: the plain ViT, the scorer alone, the Quadformer."""
    return {"vit": lambda: vit(images), "scorer": lambda: model.score(images), "quadformer": lambda: model(images)}


def run_rounds(before: Callable[[], None], last: Callable[[], None], rounds: int, warmup: int) -> None:
    """The plain :data:`RoundRunner`: ``warmup + rounds`` rounds of ``before()`` then ``last()``."""
    for _ in range(warmup + rounds):
        before()
        last()


def interleaved_ms(calls: Mapping[str, Callable[[], object]], device: torch.device | str, rounds: int = 5,
                   warmup: int = 1, runner: RoundRunner = run_rounds,
                   before_each: Callable[[], object] | None = None) -> tuple[dict[str, float], dict[str, object]]:
    """The median wall-clock ms of each of ``calls`` over rounds that run them all in their order, each call timed
    until ``device`` has finished it; and the last output of each.

    ``runner(before, last, rounds, warmup)`` runs the rounds: ``before`` times every call but the last, ``last``
    the last one. pytest-benchmark's ``benchmark.pedantic(last, setup=before, rounds=rounds,
    warmup_rounds=warmup, iterations=1)`` is one, so that its own statistics are the last call's. The medians are
    over the last ``rounds`` times of each call (all of them where the runner ran fewer rounds). ``before_each``,
    when given, runs untimed before every call (e.g. to put every call in the same cache state).
    """
    device = torch.device(device)
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, object] = {}

    def timed(name: str) -> None:
        seconds, outputs[name] = timed_call(calls[name], device)
        times[name].append(seconds)

    def before() -> None:
        for name in names[:-1]:
            if before_each is not None:
                before_each()
            timed(name)
        if before_each is not None:
            before_each()

    synchronize(device)  # the first call must not also wait for work queued before it
    runner(before, lambda: timed(names[-1]), rounds, warmup)
    return {name: 1e3 * statistics.median(values[-rounds:]) for name, values in times.items()}, outputs


def end_to_end_row(ms: Mapping[str, float], batch: int) -> dict[str, float]:
    """The figures of one comparison from the median ms of ``"vit"``, ``"scorer"`` and ``"quadformer"`` on a batch
    of ``batch`` images: each time, ``ratio`` (ViT / Quadformer), ``scorer_share`` (scorer / Quadformer) and the
    images/s of both models."""
    return {"vit_ms": ms["vit"], "quadformer_ms": ms["quadformer"], "scorer_ms": ms["scorer"],
            "ratio": ms["vit"] / ms["quadformer"], "scorer_share": ms["scorer"] / ms["quadformer"],
            "vit_images_per_s": 1e3 * batch / ms["vit"], "quadformer_images_per_s": 1e3 * batch / ms["quadformer"]}


def time_end_to_end(vit: nn.Module, model: Quadformer, images: Tensor, rounds: int = 5, warmup: int = 1,
                    runner: RoundRunner = run_rounds) -> tuple[dict[str, float], dict[str, object]]:
    """:func:`end_to_end_row` of ``vit`` against ``model`` (see :func:`quadformer_around`) on ``images``, timed
    eagerly under ``torch.inference_mode`` by :func:`interleaved_ms`; and the last output of each call."""
    with torch.inference_mode():
        ms, outputs = interleaved_ms(end_to_end_calls(vit, model, images), images.device, rounds, warmup, runner)
    return end_to_end_row(ms, images.shape[0]), outputs


END_TO_END_COLUMNS = (("ViT ms", "vit_ms", "{:.2f}"), ("Quadformer ms", "quadformer_ms", "{:.2f}"),
                      ("ratio", "ratio", "{:.2f}x"), ("scorer share", "scorer_share", "{:.1%}"),
                      ("ViT images/s", "vit_images_per_s", "{:,.1f}"),
                      ("Quadformer images/s", "quadformer_images_per_s", "{:,.1f}"))


def format_end_to_end(rows: Sequence[dict]) -> str:
    """Rows of :func:`end_to_end_row`, each with its ``"scorer"``, as a text table, a line per scorer."""
    width = max(len("scorer"), *(len(row["scorer"]) for row in rows))
    widths = [max(len(title), 10) for title, _, _ in END_TO_END_COLUMNS]
    lines = [f"{'scorer':<{width}}" + "".join(f"  {title:>{column}}"
                                              for (title, _, _), column in zip(END_TO_END_COLUMNS, widths))]
    for row in rows:
        lines.append(f"{row['scorer']:<{width}}" + "".join(f"  {spec.format(row[key]):>{column}}"
                                                           for (_, key, spec), column in zip(END_TO_END_COLUMNS,
                                                                                             widths)))
    return "\n".join(lines)
