"""Every example in README.md runs, so that none can rot.

Python blocks run as they are, each in a fresh namespace. Command lines run in-process, made small: the data folder
becomes a generated one, the photo and weight files random ones, ``--epochs`` 1, ``--batch-size`` 4, outputs go to
a temporary folder. Lines that only continue another (``...``) or that set up a machine (``make``, ``pip``) are the CI's.
"""
import os
import re
import shlex
import subprocess
import sys
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


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_python_example_runs(index):
    exec(compile(code_blocks("python")[index], f"README.md python block {index}", "exec"), {})


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
    assert ran == ["mixres.train", "mixres.evaluate"], f"README commands not run: {ran}"
    assert (substitutes["out"] / "out" / "eval" / "budgets.csv").exists()


def test_mixres_command_examples_run(substitutes, capsys):
    from mixres import cli

    ran = []
    for words in command_lines():
        if words[0] != "mixres":
            continue
        assert cli.main(small(words[1:], substitutes, model_kwargs=False)) == 0, words
        ran.append(words[1])
    assert ran == ["mosaic", "bench", "budgets"], f"README commands not run: {ran}"
    assert (substitutes["out"] / "out" / "mosaic" / "photo.json").exists()
    assert "49 52 55" in capsys.readouterr().out


def test_small_objects_script_runs(tmp_path):
    """benchmarks/small_objects.sh end to end, made small: both methods train at one budget, then the sweep."""
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    script = Path(__file__).parents[1] / "benchmarks" / "small_objects.sh"
    environment = {**os.environ, "PYTHON": sys.executable, "BUDGETS": "25", "TRAIN": "64", "VAL": "32",
                   "EPOCHS": "1", "BATCH": "16", "WORKERS": "0", "DEVICE": "cpu"}
    result = subprocess.run(["bash", str(script), str(tmp_path)], env=environment, capture_output=True, text=True,
                            timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (tmp_path / "summary.md").read_text().splitlines()[2:]
    assert [row.split("|")[1:3] for row in rows] == [[" quadformer ", " 25 "], [" uniform ", " 25 (5x5 grid) "]]
    sweep = (tmp_path / "sweep" / "budgets.csv").read_text().splitlines()
    assert len(sweep) == 1 + 2 * 6  # a header, then both methods at the script's 6 budgets
    assert (tmp_path / "sweep" / "budgets.png").stat().st_size > 0
