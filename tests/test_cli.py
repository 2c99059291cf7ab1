"""The mixres command, in-process on small generated images (and once as a subprocess): the files of ``mosaic``,
the table of ``bench``, the list of ``budgets``, and each usage error's status and message."""
import gc
import json
import math
import re
import struct
import subprocess
import sys
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mixres
from mixres import image_files
from mixres.apps import cli, end_to_end

from helpers import HANG_TIMEOUT, coverage

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
                           "--max", "64"], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                          timeout=HANG_TIMEOUT)
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


# ----------------------------------------------------------------------------------------------- end to end
END_TO_END_KEYS = {"scorer", "model", "dtype", "vit_tokens", "n_patches", "vit_ms", "quadformer_ms", "scorer_ms",
                   "ratio", "scorer_share", "vit_images_per_s", "quadformer_images_per_s"}
TINY_VIT = "vit_tiny_patch16_224"


def test_bench_end_to_end_prints_and_writes_a_row_per_scorer(tmp_path, capsys):
    results = tmp_path / "results.json"
    status, printed, _ = run(capsys, "bench", "--device", "cpu", "--batch", 2, "--repeats", 1, "--size", 64, "--width",
                             96, "--max", 32, "-n", 9, "--scorers", "pixel-blur,uniform", "--end-to-end", "--vit",
                             TINY_VIT, "--json", results)
    assert status == 0
    assert (f"end to end: {TINY_VIT} (float32, random weights) on its 24 tokens of 16 px against the Quadformer "
            f"around the same weights\non n_patches=9 leaves of 16-32 px resized to 16 px") in printed
    # scorer, ViT ms, Quadformer ms, ratio, scorer share, ViT images/s, Quadformer images/s
    printed_rows = {match[1]: match.groups()[1:] for match in
                    re.finditer(r"^(\S+) +([\d.]+) +([\d.]+) +([\d.]+)x +([\d.]+)% +([\d,.]+) +([\d,.]+)$",
                                printed, flags=re.M)}
    assert list(printed_rows) == ["pixel-blur", "uniform"]

    written = json.loads(results.read_text())
    rows = written["end_to_end"]
    assert [row["scorer"] for row in rows] == ["pixel-blur", "uniform"]
    for row in rows:
        assert set(row) == END_TO_END_KEYS
        assert (row["model"], row["dtype"], row["vit_tokens"], row["n_patches"]) == (TINY_VIT, "float32", 4 * 6, 9)
        times = [row[key] for key in ("vit_ms", "quadformer_ms", "scorer_ms")]
        assert all(math.isfinite(ms) and ms > 0 for ms in times)
        assert row["ratio"] == pytest.approx(row["vit_ms"] / row["quadformer_ms"], rel=1e-12)
        assert row["scorer_share"] == pytest.approx(row["scorer_ms"] / row["quadformer_ms"], rel=1e-12)
        assert row["vit_images_per_s"] == pytest.approx(2e3 / row["vit_ms"], rel=1e-12)
        assert row["quadformer_images_per_s"] == pytest.approx(2e3 / row["quadformer_ms"], rel=1e-12)
        vit_ms, quadformer_ms, ratio, share, vit_rate, quadformer_rate = printed_rows[row["scorer"]]
        assert (vit_ms, quadformer_ms, ratio) == (f"{row['vit_ms']:.2f}", f"{row['quadformer_ms']:.2f}",
                                                  f"{row['ratio']:.2f}")
        assert (share, vit_rate) == (f"{100 * row['scorer_share']:.1f}", f"{row['vit_images_per_s']:,.1f}")
        assert quadformer_rate == f"{row['quadformer_images_per_s']:,.1f}"
    # The tokenizer's table is still there, and --vit still adds its forward over the tokens.
    assert [row["name"] for row in written["rows"]] == ["tokenize", "reference", "pixel-blur", "uniform", "vit"]


def test_bench_end_to_end_without_vit_times_the_default_vit_alone(tmp_path, capsys, monkeypatch):
    status, printed, _ = run(capsys, "bench", "--help")
    assert status == 0 and "(without --vit: vit_base_patch16_224, as --vit alone)" in " ".join(printed.split())
    monkeypatch.setattr(cli, "DEFAULT_VIT", TINY_VIT)  # ViT-B's random initialisation alone takes seconds here
    results = tmp_path / "results.json"
    status, printed, _ = run(capsys, "bench", "--device", "cpu", "--batch", 1, "--repeats", 1, "--size", 32, "-n", 1,
                             "--scorers", "uniform", "--end-to-end", "--json", results)
    assert status == 0 and f"end to end: {TINY_VIT} (float32, random weights) on its 4 tokens" in printed
    written = json.loads(results.read_text())
    assert [row["model"] for row in written["end_to_end"]] == [TINY_VIT]
    assert "vit" not in [row["name"] for row in written["rows"]], "--end-to-end alone adds no --vit row"


def test_bench_end_to_end_refuses_a_default_model_that_is_no_vit(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "DEFAULT_VIT", "resnet18")
    status, printed, errors = run(capsys, "bench", "--device", "cpu", "--size", 32, "-n", 1, "--end-to-end",
                                  "--json", tmp_path / "results.json")
    assert status == 2 and printed == "" and not (tmp_path / "results.json").exists()
    assert ("mixres bench: error: --end-to-end (its default --vit resnet18): not a timm ViT that "
            "mixres.models.Quadformer can wrap") in errors


def test_end_to_end_quadformer_is_a_copy_of_the_vit_and_its_figures_agree():
    random_state = torch.get_rng_state()
    vit = end_to_end.random_vit(TINY_VIT, 32, 64, "cpu", torch.float32)
    assert torch.equal(torch.get_rng_state(), random_state), "the global random state must be left as it was"
    assert not vit.training and tuple(vit.patch_embed.img_size) == (32, 64)
    # The finest leaves only (min = max = the ViT's patch size): the Quadformer must compute what the ViT computes,
    # which it can only do with the same weights.
    finest = end_to_end.quadformer_around(vit, 8, "uniform", 16, 16)
    images = end_to_end.normalised_random_images(vit, 2, 32, 64)
    mean, std = (torch.tensor(vit.pretrained_cfg[key]).view(3, 1, 1) for key in ("mean", "std"))
    expected = (torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(0)) - mean) / std
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(finest(images), vit(images), rtol=1e-5, atol=1e-5)

    model = end_to_end.quadformer_around(vit, 5, "pixel-blur", 16, 32)
    assert not model.training and (model.n_patches, model.min_patch_size, model.max_patch_size) == (5, 16, 32)
    assert model.pos_embed_kind == "resample" and model.patch_size == 16
    own, copied = dict(vit.named_parameters()), dict(model.vit.named_parameters())
    assert own.keys() == copied.keys()
    for name, parameter in own.items():
        assert torch.equal(copied[name], parameter), name
        assert copied[name].data_ptr() != parameter.data_ptr(), f"{name} is shared, not copied"
    assert not {id(module) for module in vit.modules()} & {id(module) for module in model.modules()}

    row, outputs = end_to_end.time_end_to_end(vit, model, images, rounds=2, warmup=1)
    assert outputs["vit"].shape == outputs["quadformer"].shape == (2, vit.num_classes)
    assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("vit_ms", "scorer_ms", "quadformer_ms"))
    assert row["ratio"] == row["vit_ms"] / row["quadformer_ms"]
    assert row["scorer_share"] == row["scorer_ms"] / row["quadformer_ms"]
    assert row["quadformer_images_per_s"] == 2e3 / row["quadformer_ms"]


def test_interleaved_rounds_run_in_order_and_take_the_median_of_the_timed_rounds(monkeypatch):
    order = []
    calls = {name: (lambda name=name: order.append(name) or name.upper()) for name in ("vit", "scorer", "quadformer")}
    # Scripted clock: each call's times in the order it runs; the warm-up round's are far off, so that a median
    # that took them in would show.
    scripted = {"vit": [9.0, 0.004, 0.001, 0.002], "scorer": [9.0, 0.003, 0.005, 0.001],
                "quadformer": [9.0, 0.010, 0.030, 0.020]}

    def timed_call(fn, device):
        result = fn()
        return scripted[result.lower()].pop(0), result

    monkeypatch.setattr(end_to_end, "timed_call", timed_call)
    runs = []

    def runner(before, last, rounds, warmup):
        runs.append((rounds, warmup))
        end_to_end.run_rounds(before, last, rounds, warmup)

    ms, outputs = end_to_end.interleaved_ms(calls, "cpu", rounds=3, warmup=1, runner=runner)
    assert runs == [(3, 1)] and order == ["vit", "scorer", "quadformer"] * 4
    assert ms == pytest.approx({"vit": 2.0, "scorer": 3.0, "quadformer": 20.0}, rel=1e-12)
    assert outputs == {"vit": "VIT", "scorer": "SCORER", "quadformer": "QUADFORMER"}
    row = end_to_end.end_to_end_row(ms, batch=4)
    assert row["ratio"] == pytest.approx(0.1) and row["scorer_share"] == pytest.approx(0.15)
    assert row["vit_images_per_s"] == pytest.approx(2000) and row["quadformer_images_per_s"] == pytest.approx(200)


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
    (["bench", "--end-to-end", "--vit", TINY_VIT, "--size", "72", "--min", "8", "--max", "8", "-n", "81"],
     f"--size/--width: {TINY_VIT} (--end-to-end) cuts images into 16 px patches, which do not tile 72x72 px: give "
     f"sides that are multiples of 16 (of 16 and --max 8)"),
    (["bench", "--end-to-end", "--vit", "resnet18", "--size", "64", "-n", "16"],
     "--vit resnet18: not a timm ViT that mixres.models.Quadformer can wrap"),
    (["bench", "--end-to-end", "--vit", "no_such_vit", "--size", "64", "-n", "16"],
     "--vit: unknown timm model 'no_such_vit'"),
    (["budgets", "--size", "224", "--max", "64"], "224x224 px with --min 16 --max 64: image height 224 is not a "
                                                  "multiple of max_patch_size 64: resize or crop it to 192 or 256; or "
                                                  "max_patch_size=32"),
    (["budgets"], "the following arguments are required: --size"),
    (["mosaic", "{photo}", "--threshold", "64=0.1"], "--threshold: threshold as a dict must have one entry per "
                                                     "splittable patch size, keys [64, 32]"),
    (["mosaic", "{photo}", "--threshold", "1e39"], "--threshold: threshold must be finite in the scores' dtype "
                                                   "float32, got 1e+39"),
    (["budgets", "--size", "64", "--mean-tokens", "10"], "--mean-tokens and --data go together"),
    (["budgets", "--size", "64", "--data", "{tmp}"], "--data is for --mean-tokens"),
    (["budgets", "--size", "64", "-n", "10"], "-n is for the calibration: give --mean-tokens and --data"),
    (["budgets", "--size", "64", "--max", "32", "--data", "{tmp}", "--mean-tokens", "10", "17"],
     "--mean-tokens 17 must be from 4 (the roots: no image has fewer leaves) to 16 (the cap, --n-patches)"),
    (["budgets", "--size", "64", "--max", "32", "--data", "{tmp}", "--mean-tokens", "14", "-n", "13"],
     "--mean-tokens 14 must be from 4 (the roots: no image has fewer leaves) to 13"),
    (["budgets", "--size", "64", "--max", "32", "--data", "{tmp}/nowhere", "--mean-tokens", "10"],
     "--data: "),
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


# ----------------------------------------------------------------------------------------------- image modes
# load_image against values computed here from the arrays written, in float64 and rounded once to float32 (which
# equals float32's correctly rounded v / white: v / white is never within 2**-33 of a float32 midpoint).
HEIGHT, WIDTH = 5, 7  # not square: a transposition shows


def expected(values, white) -> torch.Tensor:
    """``[H, W]`` or ``[H, W, 3]`` integers or floats -> ``[3, H, W]`` float32 of value / white."""
    values = np.asarray(values, dtype=np.float64) / white
    planes = values.transpose(2, 0, 1) if values.ndim == 3 else np.stack([values] * 3)
    return torch.from_numpy(planes).float()


def random_values(dtype, channels=None, seed=0):
    shape = (HEIGHT, WIDTH) if channels is None else (HEIGHT, WIDTH, channels)
    generator = np.random.default_rng(seed)
    values = generator.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    values.flat[:2] = [0, np.iinfo(dtype).max]  # black and white included
    return values


def png_16_bit_rgb(values) -> bytes:
    """A 16-bit RGB PNG, which Pillow cannot write, from its chunks."""
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)  # filter 0 before each row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", values.shape[1], values.shape[0], 16, 2, 0, 0, 0)  # 16 bits, RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def tiff_12_bit(values) -> bytes:
    """An uncompressed 12-bit grey TIFF, which Pillow cannot write: samples packed most significant bit first, each
    row padded to a byte."""
    bits = "".join("".join(f"{int(v):012b}" for v in row).ljust(-(-12 * len(row) // 8) * 8, "0") for row in values)
    data = int(bits, 2).to_bytes(len(bits) // 8, "big")
    tags = [(256, 3, 1, values.shape[1]), (257, 3, 1, values.shape[0]), (258, 3, 1, 12), (259, 3, 1, 1),
            (262, 3, 1, 1), (273, 4, 1, 8), (277, 3, 1, 1), (278, 3, 1, values.shape[0]), (279, 4, 1, len(data))]
    directory = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *tag) for tag in tags) + b"\0" * 4
    return b"II*\0" + struct.pack("<I", 8 + len(data)) + data + directory


def mode_case(mode, folder: Path):
    """(path of a file that Pillow opens in ``mode``, the tensor load_image must return)."""
    palette = random_values(np.uint8, 3, seed=1).reshape(-1)[:768]
    palette = np.concatenate([palette, np.arange(768 - len(palette)) % 256]).astype(np.uint8)
    if mode == "1":
        values = random_values(np.uint8) > 127
        return save(Image.fromarray(values), folder / "bits.png"), expected(values, 1)
    if mode in ("L", "RGB", "RGBA", "LA"):
        values = random_values(np.uint8, {"L": None, "RGB": 3, "RGBA": 4, "LA": 2}[mode])
        colour = values[..., 0] if mode == "LA" else values[..., :3] if mode == "RGBA" else values
        return save(Image.fromarray(values, mode), folder / f"{mode}.png"), expected(colour, 255)
    if mode in ("P", "PA"):
        indices = random_values(np.uint8)
        picture = Image.fromarray(indices, "P")
        picture.putpalette(palette.tolist())
        path = folder / ("palette.png" if mode == "P" else "palette_alpha.tif")
        colours = palette.reshape(256, 3)[indices]
        return save(picture if mode == "P" else picture.convert("PA"), path), expected(colours, 255)
    if mode == "CMYK":
        values = random_values(np.uint8, 4).astype(np.int64)
        cyan_magenta_yellow, black = values[..., :3], values[..., 3:]
        rgb = np.round((255 - cyan_magenta_yellow) * (255 - black) / 255)  # Pillow's conversion, no profile
        return save(Image.fromarray(values.astype(np.uint8), "CMYK"), folder / "cmyk.tif"), expected(rgb, 255)
    if mode in ("YCbCr", "LAB"):
        picture = Image.fromarray(random_values(np.uint8, 3), mode)
        # What Pillow converts them to: mixres's own part is to read that exactly.
        return save(picture, folder / f"{mode}.tif"), expected(np.asarray(picture.convert("RGB")), 255)
    if mode in ("I;16", "I;16B"):
        values = random_values(np.uint16)
        data = values.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
        file = {"I;16": "grey16.png", "I;16B": "grey16_big_endian.tif"}[mode]
        return save(Image.frombytes(mode, (WIDTH, HEIGHT), data), folder / file), expected(values, 65535)
    if mode == "I":  # a 16-bit PGM, which Pillow opens in mode I
        values = random_values(np.uint16)
        return save(Image.fromarray(values), folder / "grey16.pgm"), expected(values, 65535)
    if mode == "F":
        values = np.random.default_rng(2).random((HEIGHT, WIDTH), dtype=np.float32)
        values.flat[:2] = [0, 1]
        return save(Image.fromarray(values, "F"), folder / "float.tif"), expected(values, 1)
    if mode == "12-bit":
        values = random_values(np.uint16) >> 4
        (folder / "grey12.tif").write_bytes(tiff_12_bit(values))
        return folder / "grey12.tif", expected(values, 4095)
    raise AssertionError(mode)


def save(picture, path):
    picture.save(path)
    return path


FILE_MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "I;16", "I;16B", "I", "F", "12-bit"]


@pytest.mark.parametrize("mode", FILE_MODES)
def test_load_image_reads_each_mode_exactly(mode, tmp_path):
    path, want = mode_case(mode, tmp_path)
    with Image.open(path) as file:
        assert file.mode == (mode if mode != "12-bit" else "I;16"), "the file does not test the mode it names"
    image = cli.load_image(path)
    assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.float32 and image.is_contiguous()
    assert torch.equal(image, want)


@pytest.mark.parametrize("mode", ["HSV", "I;16L", "I;16N", "RGBX", "RGBa", "La"])
def test_load_image_reads_the_modes_of_no_common_file(mode, tmp_path, monkeypatch):
    """Modes that no file format Pillow writes (without deprecation) opens in: handed over as if opened."""
    if mode in ("I;16L", "I;16N"):
        values = random_values(np.uint16)
        picture, want = Image.frombytes(mode, (WIDTH, HEIGHT), values.astype("=u2").tobytes()), expected(values, 65535)
    elif mode == "RGBX":
        values = random_values(np.uint8, 4)
        picture, want = Image.fromarray(values, "RGBX"), expected(values[..., :3], 255)
    else:  # HSV, and premultiplied alpha: the colours Pillow converts them to
        picture = Image.fromarray(random_values(np.uint8, 2 if mode == "La" else 3 if mode == "HSV" else 4), mode)
        colours = picture.convert("LA").getchannel("L") if mode == "La" else picture.convert("RGB")
        want = expected(np.asarray(colours), 255)
    monkeypatch.setattr(image_files.Image, "open", lambda path: picture)
    assert torch.equal(cli.load_image(tmp_path / "any"), want)


def test_16_bit_colour_is_read_as_8_bit_not_clipped(tmp_path):
    values = random_values(np.uint16, 3)
    (tmp_path / "rgb16.png").write_bytes(png_16_bit_rgb(values))
    image = cli.load_image(tmp_path / "rgb16.png")
    assert torch.equal(image * 255, (image * 255).round())  # 8-bit levels
    assert (image - expected(values, 65535)).abs().max() <= 1 / 255


@pytest.mark.parametrize("values, message", [
    (np.array([[0.5, 1.5], [-0.25, 0]]), "values from -0.25 to 1.5: float images are read as they are"),
    (np.array([[0.5, np.nan], [0, 1]]), "holds NaN"),
    (np.array([[0.5, np.inf], [0, 1]]), "values from 0 to inf"),
    (np.array([[0, 255], [12, 200]]), "values from 0 to 255"),  # 8-bit values in a float image: not rescaled
])
def test_float_images_outside_0_1_are_refused_with_their_range(values, message, tmp_path):
    Image.fromarray(values.astype(np.float32), "F").save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=re.escape(message)):
        cli.load_image(tmp_path / "float.tif")


def test_32_bit_integer_images_are_refused(tmp_path):
    Image.fromarray(np.array([[0, 70000], [5, 2**31 - 1]], dtype=np.int32), "I").save(tmp_path / "int32.tif")
    with pytest.raises(ValueError, match="32-bit integers .* no file states"):
        cli.load_image(tmp_path / "int32.tif")


def test_several_frames_give_the_first_with_a_warning(tmp_path):
    frames = [Image.fromarray(random_values(np.uint8, seed=seed), "L").convert("P") for seed in (3, 4)]
    frames[0].save(tmp_path / "animation.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match="2 frames .* only the first is read"):
        image = cli.load_image(tmp_path / "animation.gif")
    assert torch.equal(image, expected(np.asarray(frames[0].convert("RGB")), 255))


def test_mosaic_of_a_16_bit_png_keeps_its_values(tmp_path, capsys):
    """The reported bug: convert("RGB") clipped 16-bit values to 255, so the photo came out white."""
    values = np.random.default_rng(5).integers(0, 20000, (64, 128), dtype=np.uint16)  # dark: at most 0.31
    Image.fromarray(values).save(tmp_path / "dark16.png")
    status, printed, errors = run(capsys, "mosaic", tmp_path / "dark16.png", "-o", tmp_path / "out")
    assert status == 0 and errors == ""
    with Image.open(tmp_path / "out" / "dark16.png") as figure:
        left = np.asarray(figure)[:, :128]
    photo = np.round(values / 65535 * 255)  # 64 x 128 fits: not resampled
    border = np.zeros(photo.shape, bool)
    for y, x, size in json.loads((tmp_path / "out" / "dark16.json").read_text())["leaves"]:
        border[y:y + size, x:x + size] = True
        border[y + 1:y + size - 1, x + 1:x + size - 1] = False
    assert (left[~border] == photo[~border][:, None]).all() and photo.max() <= 80


def test_mosaic_refuses_a_float_image_out_of_range_before_writing(tmp_path, capsys):
    Image.fromarray(np.full((64, 64), 3.0, np.float32), "F").save(tmp_path / "bright.tif")
    status, _, errors = run(capsys, "mosaic", tmp_path / "bright.tif", "-o", tmp_path / "out")
    assert status == 2 and "bright.tif: a float image (Pillow mode F) with values from 3 to 3" in errors
    assert not (tmp_path / "out").exists()


def test_mosaic_shows_a_warning_once(tmp_path, capsys):
    frames = [Image.fromarray(random_values(np.uint8, seed=seed), "L").resize((64, 64)) for seed in (3, 4)]
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    status, _, errors = run(capsys, "mosaic", tmp_path / "pages.tif", "-o", tmp_path / "out")
    assert status == 0 and errors == f"mixres mosaic: warning: {tmp_path / 'pages.tif'}: 2 frames (an animation or " \
                                      f"pages): only the first is read\n"


# ---------------------------------------------------------------------------------------------------- budgets
def test_budgets_beyond_a_thousand_shows_the_ends(capsys):
    status, printed, _ = run(capsys, "budgets", "--size", 4096, "--min", 1)  # --max 4: 1024**2 roots, 4096**2 leaves
    assert status == 0
    header, shown, hint = printed.splitlines()
    assert header.endswith("n_patches = 1048576 + 3k (each split adds 3), 5242881 budgets:")
    assert shown == "1048576 1048579 1048582 1048585 1048588 ... 16777204 16777207 16777210 16777213 16777216"
    assert hint == "(--all lists every one)"


def test_budgets_all_lists_every_one_in_lines_of_100(capsys):
    status, printed, _ = run(capsys, "budgets", "--size", 512, "--min", 4, "--max", 16, "--all")
    assert status == 0
    header, *lines = printed.splitlines()
    assert "1024 roots of 16 px, at most 16384 leaves of 4 px" in header and "5121 budgets:" in header
    assert [int(n) for line in lines for n in line.split()] == list(range(1024, 16385, 3))
    assert all(len(line) <= 100 for line in lines) and all(len(a) + 1 + len(b.split()[0]) > 100
                                                            for a, b in zip(lines, lines[1:]))  # each line full


def test_budgets_at_the_limits_of_the_sizes(capsys):
    status, printed, _ = run(capsys, "budgets", "--size", 2**30, "--min", 1, "--max", 2**30)
    assert status == 0
    header, shown, _ = printed.splitlines()
    assert f"1 roots of {2**30} px, at most {4**30} leaves of 1 px" in header
    assert f"{(4**30 - 1) // 3 + 1} budgets" in header and shown.endswith(f" {4**30 - 3} {4**30}")


def test_budgets_memory_does_not_grow_with_the_list():
    """5 million budgets took 870 MB as a list and its text; printed as they are computed, they take nothing."""
    child = ("import resource, sys\n"
             "from mixres.apps import cli\n"
             "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "cli.main(['budgets', '--size', '64'])\n"
             "before = peak()\n"
             "assert cli.main(['budgets', '--size', '4096', '--min', '1']) == 0\n"
             "assert cli.main(['budgets', '--size', '2048', '--min', '1', '--all']) == 0\n"
             "print(peak() - before, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", child], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          cwd=Path(__file__).parents[1], timeout=HANG_TIMEOUT)
    assert done.returncode == 0, done.stderr
    growth_kb = int(done.stderr.split()[-1])
    # The 1.3 million budgets of --size 2048 --min 1 alone would take over 45 MB as Python ints in a list.
    assert growth_kb < 20_000, f"peak RSS grew by {growth_kb} kB"


# ----------------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("argv, message", [
    (["bench", "--size", 2**30, "--max", 2**30, "-n", 1], "a batch of 16 random 1073741824x1073741824 images needs "
                                                            "about"),
    (["bench", "--batch", 10**12, "--size", 64, "-n", 16], "a batch of 1000000000000 random 64x64 images needs about"),
    (["mosaic", "{photo}", "--max", 2**30], "photo.jpg (128x128 px, resized to 1073741824x1073741824) needs about"),
    (["mosaic", "{photo}", "--size", 2**20 * 64], "(128x128 px, resized to 67108864x67108864) needs about"),
])
def test_work_that_cannot_fit_in_memory_is_refused_before_it_starts(argv, message, images, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setattr(cli, "load_image", lambda path: pytest.fail("an image was read"))
    monkeypatch.setattr(cli.torch, "rand", lambda *args, **kwargs: pytest.fail("images were made"))
    argv = [str(arg).format(photo=images[0]) for arg in argv] + ["-o" if argv[0] == "mosaic" else "--json",
                                                                tmp_path / "out"]
    status, _, errors = run(capsys, *argv)
    assert status == 2 and message in errors and re.search(r"more than this machine's [\d,.]+ GiB: lower", errors)
    assert not (tmp_path / "out").exists()


def test_mosaic_batch_larger_than_the_images_is_the_images(images, tmp_path, capsys):
    status, printed, _ = run(capsys, "mosaic", *images, "--batch", 10**18, "-o", tmp_path / "out")
    assert status == 0 and len(printed.splitlines()) == len(images)


def test_mosaic_holds_one_batch_of_images_at_a_time(tmp_path, capsys, monkeypatch):
    """Images are read again batch by batch, not all kept from the first reading: at each tokenize call, the only
    images alive are the batch's."""
    for index in range(5):
        Image.fromarray(random_values(np.uint8, 3, seed=index)).resize((64, 64)).save(tmp_path / f"{index}.png")
    alive, fitted = [], cli.fit_to_multiple
    tokenize = cli.tokenize

    def tracked_fit(*args, **kwargs):
        image = fitted(*args, **kwargs)
        alive.append(weakref.ref(image))
        return image

    def counting_tokenize(images, *args, **kwargs):
        gc.collect()
        assert sum(ref() is not None for ref in alive) <= len(images), "images of other batches are held"
        return tokenize(images, *args, **kwargs)

    monkeypatch.setattr(cli, "fit_to_multiple", tracked_fit)
    monkeypatch.setattr(cli, "tokenize", counting_tokenize)
    status, printed, _ = run(capsys, "mosaic", *sorted(tmp_path.glob("*.png")), "--batch", 2, "-o", tmp_path / "out")
    assert status == 0 and len(printed.splitlines()) == 5


# ------------------------------------------------------------------------------------------- adaptive budgets
def test_mosaic_with_a_threshold_gives_each_image_its_own_leaves_under_the_cap(images, tmp_path, capsys):
    import mixres
    from mixres.image_files import load_image
    from mixres.scorers import PixelBlur

    status, printed, _ = run(capsys, "mosaic", *images[:3], "--threshold", "64=0.02,32=0.01", "-n", "40", "--nearest",
                             "-o", tmp_path / "out")
    assert status == 0
    counts = []
    for path in images[:3]:
        record = json.loads((tmp_path / "out" / f"{path.stem}.json").read_text())
        image = load_image(path)
        image = torch.nn.functional.interpolate(image[None], size=(record["height"], record["width"]),
                                                mode="bilinear", antialias=True).clamp(0, 1) \
            if tuple(image.shape[-2:]) != (record["height"], record["width"]) else image[None]
        cap = record["max_patches"]
        expected = mixres.tokenize(image, PixelBlur(16, 64), cap, threshold={64: 0.02, 32: 0.01}).lengths.item()
        assert record["threshold"] == {"64": 0.02, "32": 0.01} and record["n_patches"] == expected
        assert len(record["leaves"]) == expected <= cap
        assert f"{path}: " in printed and f"n_patches={expected} of at most {cap} " in printed
        counts.append(expected)
    assert len(set(counts)) > 1
    assert f"3 images, threshold 64=0.02,32=0.01: {sum(counts) / 3:.1f} tokens per image on average (min " \
           f"{min(counts)}, max {max(counts)})" in printed


def test_budgets_calibrates_thresholds_for_mean_token_counts(tmp_path, capsys):
    pytest.importorskip("skimage")
    import mixres
    from mixres.apps.loaders import build_dataset
    from mixres.scorers import PixelBlur

    status, printed, _ = run(capsys, "budgets", "--size", "64", "--max", "32", "--mean-tokens", "7", "12.5", "--data",
                             "small-objects", "--calibration-images", "20", "--json", tmp_path / "t.json")
    assert status == 0, printed
    assert "64x64 px, 16-32 px leaves (4 roots, cap 16), scorer pixel-blur, 20 images of small-objects" in printed
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["config"]["images"] == 20 and [c["target"] for c in saved["calibrations"]] == [7, 12.5]
    # The images of small-objects' val split (20 of them, as generated with --seed 0), tokenized at each threshold.
    dataset = build_dataset("small-objects", "val", 64, (0.0,) * 3, (1.0,) * 3, train=False, length=20)
    images = torch.stack([dataset[index][0] for index in range(20)])
    for calibration in saved["calibrations"]:
        lengths = mixres.tokenize(images, PixelBlur(16, 32), 16, threshold=calibration["threshold"]).lengths
        assert (lengths.double().mean().item(), lengths.min().item(), lengths.max().item()) == \
            (calibration["mean_tokens"], calibration["min_tokens"], calibration["max_tokens"])
        assert f"--mean-tokens {calibration['target']:g}: threshold {calibration['threshold']!r} " in printed
