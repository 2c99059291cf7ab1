"""Every example in README.md runs, so that none can rot, and what its comments state is true.

Python blocks run as they are, each in a fresh namespace, one statement at a time: a comment that states a shape or
values in brackets is checked against the value of its line (see ``check_statement``). Command lines run
in-process, made small: the data folder becomes a generated one, the photo and weight files random ones,
``--epochs`` 1, ``--batch-size`` 4, outputs go to a temporary folder. Lines that only continue another (``...``) or
that set up a machine (``make``, ``pip``) are the CI's.
"""
import ast
import io
import math
import os
import re
import shlex
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from helpers import HANG_TIMEOUT

README = (Path(__file__).parents[1] / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def command_lines() -> list[list[str]]:
    """The README's shell commands, continuation lines joined, comments dropped, split into words."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


# The README's legend: N is the budget (n_patches) and p the token size (patch_size, by default min_patch_size), so
# they are what a block passes for those arguments (where it passes one value). The other symbols (B, C, H, W...)
# are defined where they first appear, as in "images = torch.rand(...)  # [B, C, H, W]".
ARGUMENT_SYMBOLS = {"N": "n_patches", "p": "min_patch_size"}
BRACKETS = re.compile(r"\[([^][]*)\]((?:\s*\(\d+ px\))?)")


def check_statement(value, comment: str, symbols: dict) -> None:
    """Asserts what ``comment`` states of ``value``, binding in ``symbols`` the symbols it is the first to use.

    - A tensor: its shape, ``[B, N, C*p*p]`` (integers, symbols, products), then its dtype (``int32``) or ``view``
      where the comment names them right after the brackets.
    - A list of tensors: one bracketed shape per tensor, in order; ``(s px)`` after one says that it is the map of
      patch size s, ``[..., H/s, W/s]``.
    - A list of numbers: its values, ``...`` standing for any number of them (``[49, 52, ..., 100, ..., 196]``).
    """
    def check_shape(shape, dims):
        assert len(shape) == len(dims), f"{comment!r}: the shape is {tuple(shape)}"
        for size, dim in zip(shape, dims):
            factors = [factor.strip() for factor in dim.split("*")]
            if len(factors) == 1 and factors[0].isidentifier() and factors[0] not in symbols:
                symbols[factors[0]] = size
            expected = math.prod(int(factor) if factor.isdigit() else symbols[factor] for factor in factors)
            symbolic = "" if dim.strip().isdigit() else f", where {dim.strip()} = {expected}"
            assert size == expected, f"{comment!r}: the shape is {tuple(shape)}{symbolic}"

    stated = list(BRACKETS.finditer(comment))
    assert stated, f"{comment!r} states nothing this test can read"
    if isinstance(value, torch.Tensor):
        (match,) = stated
        check_shape(value.shape, match.group(1).split(","))
        after = comment[match.end():].split()[:1]
        if after and isinstance(getattr(torch, after[0], None), torch.dtype):
            assert value.dtype == getattr(torch, after[0]), f"{comment!r}: the dtype is {value.dtype}"
        if after == ["view"]:
            assert value._is_view(), f"{comment!r}: not a view"
    elif all(isinstance(item, torch.Tensor) for item in value):
        assert len(value) == len(stated), f"{comment!r}: {len(value)} tensors"
        for item, match in zip(value, stated):
            check_shape(item.shape, match.group(1).split(","))
            if match.group(2):
                size = int(re.search(r"\d+", match.group(2)).group())
                assert tuple(item.shape[-2:]) == (symbols["H"] // size, symbols["W"] // size), \
                    f"{comment!r}: the map of {size} px is {tuple(item.shape)}"
    else:
        (match,) = stated
        values = list(value)
        pieces = [[int(number) for number in piece.split(",") if number.strip()]
                  for piece in match.group(1).split("...")]
        if len(pieces) == 1:
            assert values == pieces[0], f"{comment!r}: the values are {values}"
            return
        first, *middle, last = pieces
        assert values[:len(first)] == first and values[len(values) - len(last):] == last, \
            f"{comment!r}: the values are {values}"
        between = iter(values[len(first):len(values) - len(last)])
        assert all(number in between for piece in middle for number in piece), \
            f"{comment!r}: the values are {values}"  # in order: ``in`` consumes the iterator up to the match


def run_checking_statements(code: str, name: str) -> list[str]:
    """Runs ``code`` one statement at a time and checks each comment that states something in brackets against
    the value of its line: an expression's value, or what an assignment assigned (of several statements on a line,
    the last). Returns the comments checked."""
    comments = {token.start[0]: token.string for token in tokenize.generate_tokens(io.StringIO(code).readline)
                if token.type == tokenize.COMMENT and "[" in token.string}
    symbols = {}
    for symbol, argument in ARGUMENT_SYMBOLS.items():
        values = set(re.findall(rf"\b{argument}=(\d+)", code))
        if len(values) == 1:
            symbols[symbol] = int(values.pop())
    namespace, checked = {}, []
    statements = ast.parse(code).body
    for statement, following in zip(statements, statements[1:] + [None]):
        line = statement.end_lineno
        comment = comments.get(line) if following is None or following.lineno > line else None
        if comment is not None and isinstance(statement, ast.Expr):
            value = eval(compile(ast.Expression(statement.value), name, "eval"), namespace)
        else:
            exec(compile(ast.Module([statement], type_ignores=[]), name, "exec"), namespace)
            if comment is not None:
                (target,) = statement.targets
                value = namespace[target.id]
        if comment is not None:
            check_statement(value, comment, symbols)
            checked.append(comment)
    assert checked == list(comments.values()), "a comment that states something ends no statement"
    return checked


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_python_example_runs_and_what_it_states_is_true(index):
    run_checking_statements(code_blocks("python")[index], f"README.md python block {index}")


def test_the_api_example_states_shapes_dtypes_views_and_values():
    """The block of "API in short" states what it computes in each form the checker reads: all are checked."""
    checked = " ".join(run_checking_statements(code_blocks("python")[0], "README.md python block 0"))
    for form in ("[B, C, H, W]", "(64 px)", "C*p*p", "int32", "float32", "view", "..."):
        assert form in checked, form


# What a README could say, true then false: the checker passes the one and fails the other.
@pytest.mark.parametrize("true, false", [
    ("x = torch.zeros(2, 3)  # [2, 3]", "x = torch.zeros(2, 3)  # [2, 4]"),
    ("x = torch.zeros(2, 3)  # [B, C]\ny = torch.zeros(2, 3)  # [B, C]",
     "x = torch.zeros(2, 3)  # [B, C]\ny = torch.zeros(3, 2)  # [B, C]"),
    ("x = torch.zeros(2, 3, 3)  # [B, p, p]\ny = torch.zeros(2, 9)  # [B, p*p]",
     "x = torch.zeros(2, 3, 3)  # [B, p, p]\ny = torch.zeros(2, 10)  # [B, p*p]"),
    ("call = dict(n_patches=5)\nx = torch.zeros(2, 5)  # [B, N]",
     "call = dict(n_patches=4)\nx = torch.zeros(2, 5)  # [B, N]"),
    ("x = torch.zeros(2, dtype=torch.int32)  # [2] int32", "x = torch.zeros(2, dtype=torch.int64)  # [2] int32"),
    ("x = torch.zeros(3, 2).t()  # [2, 3] view", "x = torch.zeros(2, 3).clone()  # [2, 3] view"),
    ("x = [torch.zeros(1, 4, 4), torch.zeros(1, 8, 8)]  # [1, 4, 4], [1, 8, 8]",
     "x = [torch.zeros(1, 4, 4)]  # [1, 4, 4], [1, 8, 8]"),
    ("images = torch.zeros(1, 3, 128, 64)  # [B, C, H, W]\nx = [torch.zeros(1, 2, 1)]  # [B, 2, 1] (64 px)",
     "images = torch.zeros(1, 3, 128, 64)  # [B, C, H, W]\nx = [torch.zeros(1, 2, 1)]  # [B, 2, 1] (32 px)"),
    ("list(range(1, 10))  # [1, 2, ..., 9]", "list(range(1, 10))  # [1, 2, ..., 8]"),
    ("[1, 2, 5, 9]  # [1, ..., 5, ..., 9]", "[1, 2, 5, 9]  # [1, ..., 4, ..., 9]"),
    ("[1, 2, 5, 9]  # [..., 2, 5, ...]", "[1, 2, 5, 9]  # [..., 5, 2, ...]"),
    ("[1, 9]  # [1, 9]", "[1, 2, 9]  # [1, 9]"),
])
def test_a_false_statement_fails(true, false):
    assert run_checking_statements("import torch\n" + true, "true")
    with pytest.raises(AssertionError):
        run_checking_statements("import torch\n" + false, "false")


@pytest.fixture(scope="module")
def substitutes(tmp_path_factory):
    """What the README's placeholders become: a small image folder and random weight files."""
    root = tmp_path_factory.mktemp("readme")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("val", 3)):
        for label, colour in enumerate(((220, 40, 40), (40, 40, 220))):
            folder = root / "imagenet" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                noise = torch.randint(0, 30, (48, 48, 3), generator=generator, dtype=torch.uint8)
                pixels = (torch.tensor(colour, dtype=torch.uint8) + noise).clamp(0, 255)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    photo = root / "photo.jpg"
    Image.fromarray(torch.randint(0, 256, (200, 300, 3), generator=generator, dtype=torch.uint8).numpy()).save(photo)
    weights = root / "vit_small_patch16_224.pth"
    torch.save(timm.create_model("vit_small_patch16_224", depth=1).state_dict(), weights)
    return {"/data/imagenet": str(root / "imagenet"), "vit_small_patch16_224.pth": str(weights), "out": root / "out",
            "photo.jpg": str(photo),
            "depth": '{"depth": 1}'}


def small(words: list[str], substitutes: dict, model_kwargs: bool = True) -> list[str]:
    """The arguments of a README command line (after the module), made small as the module docstring says."""
    shrink = {"--epochs": "1", "--batch-size": "4"}
    out, skip = [], False
    for previous, word in zip([None] + words, words):
        if skip:
            skip = False
            continue
        if previous in shrink:
            out[-1:] = [previous, shrink[previous]]
            continue
        word = substitutes.get(word, word)
        if previous in ("--output", "--checkpoint", "-o"):
            word = str(substitutes["out"] / word)
        out.append(str(word))
    return out + (["--model-kwargs", substitutes["depth"]] if model_kwargs else [])


@pytest.mark.filterwarnings("ignore:.*left at their random initialisation")  # 1000 ImageNet classes, 2 here
def test_training_and_evaluation_examples_run(substitutes):
    from mixres import evaluate, train

    ran = []
    for words in command_lines():
        if "..." in words or words[:2] != ["python", "-m"]:
            continue
        module, args = words[2], small(words[3:], substitutes)
        if module == "mixres.train":
            train.main(args + ["--workers", "0"])
        elif module == "mixres.evaluate":
            evaluate.main(args + ["--timed-batches", "1", "--warmup", "0"])
        else:
            continue
        ran.append(module)
    assert ran == ["mixres.train", "mixres.train", "mixres.evaluate", "mixres.evaluate"], \
        f"README commands not run: {ran}"
    assert (substitutes["out"] / "out" / "eval" / "budgets.csv").exists()


def test_mixres_command_examples_run(substitutes, capsys):
    from mixres import cli

    ran = []
    for words in command_lines():
        if words[0] != "mixres":
            continue
        assert cli.main(small(words[1:], substitutes, model_kwargs=False)) == 0, words
        ran.append(words[1])
    assert ran == ["mosaic", "bench", "budgets", "budgets", "mosaic"], f"README commands not run: {ran}"
    # "out/mosaic/photo.png (leaf borders, tokens) and .json (leaves)"
    assert all((substitutes["out"] / "out" / "mosaic" / f"photo.{suffix}").exists() for suffix in ("png", "json"))
    assert "49 52 55" in capsys.readouterr().out


def test_small_objects_script_runs(tmp_path):
    """benchmarks/small_objects.sh end to end, made small: both methods train at one budget, then the full-resolution
    control, then the sweep."""
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    script = Path(__file__).parents[1] / "benchmarks" / "small_objects.sh"
    environment = {**os.environ, "PYTHON": sys.executable, "BUDGETS": "25", "TRAIN": "64", "VAL": "32",
                   "EPOCHS": "1", "BATCH": "16", "WORKERS": "0", "DEVICE": "cpu"}
    result = subprocess.run(["bash", str(script), str(tmp_path)], env=environment, capture_output=True, text=True,
                            timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (tmp_path / "summary.md").read_text().splitlines()[2:]
    assert [row.split("|")[1:3] for row in rows] == [[" quadformer ", " 25 "], [" uniform ", " 25 (5x5 grid) "],
                                                     [" uniform, control ", " 256 (16x16 grid) "]]
    for run in ("quadformer-25", "uniform-25", "control-256"):
        assert len((tmp_path / run / "log.jsonl").read_text().splitlines()) == 1  # one row per epoch
    sweep = (tmp_path / "sweep" / "budgets.csv").read_text().splitlines()
    assert len(sweep) == 1 + 2 * 6  # a header, then both methods at the script's 6 budgets
    assert (tmp_path / "sweep" / "budgets.png").stat().st_size > 0
