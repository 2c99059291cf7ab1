"""The mixres command, in-process on small generated images (and once as a subprocess): the files of ``mosaic``,
the table of ``bench``, the list of ``budgets``, and each usage error's status and message."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mixres
from mixres import cli

from helpers import coverage

# name: (Pillow mode, height, width, size after the default resize to multiples of 64)
IMAGES = {
    "photo.jpg": ("RGB", 128, 128, (128, 128)),
    "wide.png": ("RGB", 100, 150, (128, 128)),  # 1.56 and 2.34 roots: resized to the size of photo.jpg
    "grey.png": ("L", 64, 128, (64, 128)),      # fits: not resampled
    "tall.png": ("RGB", 200, 96, (192, 128)),   # 96 px is 1.5 roots: halves round up
}


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """The files of :data:`IMAGES`: smooth gradients with a bright square, so that the scorers have detail to find."""
    paths = []
    for name, (mode, height, width, _) in IMAGES.items():
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
        pixels[height // 4:height // 2, width // 4:width // 2] = 255
        picture = Image.fromarray(pixels.astype(np.uint8), "RGB").convert(mode)
        picture.save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def run(capsys, *argv) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit status, stdout, stderr)."""
    status = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_mosaic_writes_figures_and_leaves(images, tmp_path, capsys, monkeypatch):
    batches = []
    tokenize = cli.tokenize

    def recording_tokenize(batch, *args, **kwargs):
        batches.append(tuple(batch.shape))
        return tokenize(batch, *args, **kwargs)

    monkeypatch.setattr(cli, "tokenize", recording_tokenize)
    out = tmp_path / "out"
    status, printed, errors = run(capsys, "mosaic", *images, "-n", 40, "--nearest", "--scorer", "pixel-blur",
                                  "-o", out, "--device", "cpu")
    assert status == 0 and errors == ""
    assert sorted(batches) == [(1, 3, 64, 128), (1, 3, 192, 128), (2, 3, 128, 128)]  # one batch per size
    lines = printed.splitlines()
    assert len(lines) == len(images)

    for path in images:
        _, source_height, source_width, (height, width) = IMAGES[path.name]
        record = json.loads((out / f"{path.stem}.json").read_text())
        assert record["image"] == str(path) and record["source_size"] == [source_height, source_width]
        assert (record["height"], record["width"]) == (height, width)
        assert (record["min_patch_size"], record["max_patch_size"]) == (16, 64)
        assert record["scorer"] == repr(mixres.PixelBlur(16, 64)) and record["mode"] == "area"
        geometry = mixres.QuadtreeGeometry(height, width, 16, 64)
        assert record["n_patches"] == min(geometry.valid_n_patches(), key=lambda n: (abs(n - 40), n))
        leaves = torch.tensor(record["leaves"])
        assert len(leaves) == record["n_patches"]
        assert (coverage(leaves[None], height, width) == 1).all(), f"{path.name}: leaves overlap or leave gaps"
        assert all(side in (16, 32, 64) and y % side == 0 and x % side == 0 for y, x, side in record["leaves"])
        assert {int(side): count for side, count in record["leaves_per_size"].items()} == \
            {side: int((leaves[:, 2] == side).sum()) for side in leaves[:, 2].unique().tolist()}
        with Image.open(out / f"{path.stem}.png") as figure:
            assert figure.size == (2 * width + 8, height)
        assert any(line.startswith(f"{path}: {source_height}x{source_width} -> {height}x{width}, "
                                   f"n_patches={record['n_patches']} ") for line in lines)


def test_mosaic_size_scorer_and_default_budget(images, tmp_path, capsys):
    out = tmp_path / "out"
    wide = images[1]
    status, printed, _ = run(capsys, "mosaic", wide, "--size", 64, "--min", 16, "--max", 32, "--scorer", "random",
                             "--scorer-kwargs", '{"seed": 3}', "--mode", "bilinear", "-o", out)
    assert status == 0
    record = json.loads((out / "wide.json").read_text())
    assert (record["height"], record["width"]) == (64, 96)  # short side 64, long side 150 * 64 / 100
    assert record["n_patches"] == 9  # of 6 + 3k, the nearest to a third of the 24 most
    assert record["scorer"] == repr(mixres.Random(16, 32, seed=3)) and record["mode"] == "bilinear"
    assert "64x96" in printed


def test_load_image_is_upright_rgb(images, tmp_path):
    grey = cli.load_image(images[2])
    assert grey.shape == (3, 64, 128) and grey.dtype == torch.float32
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2]) and 0 <= grey.min() <= grey.max() <= 1

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, show the pixels rotated by 90 degrees
    Image.new("RGBA", (40, 20), (255, 0, 0, 0)).save(tmp_path / "turned.png", exif=exif)
    turned = cli.load_image(tmp_path / "turned.png")
    assert turned.shape == (3, 40, 20) and torch.equal(turned[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_budgets_lists_valid_n_patches(capsys):
    status, printed, _ = run(capsys, "budgets", "--size", 224)  # --max defaults to 32: 64 does not divide 224
    assert status == 0
    header, *lines = printed.splitlines()
    assert header.startswith("224x224 px, 16-32 px leaves: 49 roots of 32 px, at most 196 leaves of 16 px")
    assert [int(n) for line in lines for n in line.split()] == mixres.valid_n_patches(224, min_patch_size=16,
                                                                                      max_patch_size=32)


def test_budgets_as_a_subprocess():
    done = subprocess.run([sys.executable, "-m", "mixres", "budgets", "--size", "256", "--width", "384", "--min", "16",
                           "--max", "64"], capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert "24 roots of 64 px, at most 384 leaves of 16 px" in header
    assert [int(n) for line in lines for n in line.split()] == mixres.valid_n_patches(256, 384, 16, 64)


def test_bench_prints_a_table(tmp_path, capsys):
    results = tmp_path / "bench" / "results.json"
    status, printed, _ = run(capsys, "bench", "--device", "cpu", "--batch", 2, "--repeats", 1, "--size", 128,
                             "--n-patches", 40, "--json", results)
    assert status == 0
    assert "2 random 128x128 RGB images a batch, n_patches=40, 16-64 px leaves" in printed
    table = {}
    for line in printed.splitlines():
        match = re.match(r"(.+?)\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)$", line)
        if match:
            table[match[1]] = float(match[2]), float(match[3].replace(",", ""))
    labels = [f"mixres.tokenize ({cli.kernel_label(torch.device('cpu'))})", "mixres.reference.tokenize (PyTorch)",
              "scorer pixel-blur", "scorer entropy", "scorer random", "scorer uniform"]
    assert list(table) == labels
    assert all(ms > 0 for ms, _ in table.values())
    assert re.search(r"mixres.tokenize is [\d.]+x as fast as mixres.reference.tokenize", printed)

    written = json.loads(results.read_text())
    assert written["config"]["batch"] == 2 and written["config"]["max_patch_size"] == 64
    assert [row["label"] for row in written["rows"]] == labels
    assert all(row["images_per_s"] > 0 for row in written["rows"]) and written["rows"][0]["vs_tokenize"] == 1


def test_bench_feature_scorer_and_vit_are_labelled(capsys):
    status, printed, _ = run(capsys, "bench", "--device", "cpu", "--batch", 1, "--repeats", 1, "--size", 64,
                             "--n-patches", 7, "--scorers", "feature", "--vit", "vit_tiny_patch16_224")
    assert status == 0
    assert "scorer feature (shufflenet_v2_x0_5, random weights)" in printed
    assert "vit_tiny_patch16_224 forward (float32, random weights)" in printed
    assert re.search(r"mixres.tokenize costs [\d.]+% of the vit_tiny_patch16_224 forward over its 7 tokens", printed)


@pytest.mark.parametrize("argv, message", [
    (["mosaic", "{missing}"], "missing.png: no such file"),
    (["mosaic", "{text}"], "notes.png: cannot read it as an image"),
    (["mosaic", "{photo}", "--scorer", "saliency"], "argument --scorer: invalid choice: 'saliency'"),
    (["mosaic", "{photo}", "--scorer", "feature"], "--scorer feature: backbone 'shufflenet_v2_x0_5' needs weights"),
    (["mosaic", "{photo}", "--scorer-kwargs", "{{seed: 1}}"], "argument --scorer-kwargs: not JSON"),
    (["mosaic", "{photo}", "--min", "16", "--max", "48"], "--min 16 --max 48: max_patch_size / min_patch_size must "
                                                          "be a power of two"),
    (["mosaic", "{photo}", "-n", "41"], "photo.jpg (resized to 128x128): n_patches=41 is unreachable"),
    (["mosaic", "{photo}", "--size", "100"], "--size 100 with --max 64: image height 100 is not a multiple of "
                                             "max_patch_size 64"),
    (["mosaic", "{photo}", "-o", "{photo}/out"], "cannot create the folder"),
    (["mosaic", "{photo}", "{tmp}/photo.png"], "would both be written as"),
    (["mosaic", "{photo}", "--device", "tpu"], "argument --device: 'tpu' cannot be used here"),
    (["bench", "--n-patches", "101"], "--n-patches: n_patches=101 is unreachable for a 224x224 image with patches of "
                                      "16 to 32 px: it must be 49 + 3k (each split adds 3 leaves) and at most 196; "
                                      "nearest valid: 100 or 103"),
    (["bench", "--scorers", "pixel-blur,gradcam"], "argument --scorers: unknown scorer 'gradcam'"),
    (["bench", "--json", "{tmp}"], "a folder; give a file name"),
    (["budgets", "--size", "224", "--max", "64"], "224x224 px with --min 16 --max 64: image height 224 is not a "
                                                  "multiple of max_patch_size 64: resize or crop it to 192 or 256; or "
                                                  "max_patch_size=32"),
    (["budgets"], "the following arguments are required: --size"),
    ([], "the following arguments are required: COMMAND"),
])
def test_usage_errors(argv, message, images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default output folder would be
    (tmp_path / "notes.png").write_text("not an image")
    paths = dict(missing=tmp_path / "missing.png", text=tmp_path / "notes.png", photo=images[0], tmp=tmp_path)
    status, printed, errors = run(capsys, *[arg.format(**paths) for arg in argv])
    assert status == 2 and printed == ""
    command = f"mixres {argv[0]}" if argv else "mixres"
    assert f"{command}: error: " in errors and message in errors and "Traceback" not in errors
    assert not (tmp_path / "out").exists(), "a usage error must stop the run before anything is written"


def test_unwritable_output_folder(images, tmp_path, capsys, monkeypatch):
    # Permissions do not bind root, so the folder's mode cannot be trusted to refuse: os.access is what is asked.
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    status, _, errors = run(capsys, "mosaic", images[0], "-o", tmp_path / "locked")
    assert status == 2 and f"--out {tmp_path / 'locked'}: the folder is not writable" in errors


def test_help_exits_zero(capsys):
    status, printed, _ = run(capsys, "mosaic", "--help")
    assert status == 0 and "--nearest" in printed and "multiple of --max" in printed
