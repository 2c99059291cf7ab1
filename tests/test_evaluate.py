"""mixres.evaluate and the uniform-grid baseline: the baseline is timm's own ViT on the resized images; a budget
sweep over a generated image folder (rows, accuracy, MACs against a hand count, files); checkpoints; the errors."""
import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from mixres.apps import evaluate
from mixres.models import Quadformer, UniformGrid, grid_for_budget
from mixres.pyramid import QuadtreeGeometry
from mixres.scorers import FeatureBased

from helpers import HANG_TIMEOUT

CONFIG = dict(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=5)
# The same ViT for the command line: timm's vit_tiny at 64 px, 32 wide, one block.
CLI_MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "64", "--num-classes", "5",
             "--model-kwargs", json.dumps(dict(embed_dim=32, depth=1, num_heads=2))]


@pytest.fixture(autouse=True)
def one_thread():
    # Models this small gain nothing from threads, and on a busy machine each parallel region can wait a tick.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """5 classes of 2 random 64 x 64 PNG images each, in torchvision's ImageFolder layout."""
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for label in range(5):
        (root / f"class{label}").mkdir()
        for index in range(2):
            pixels = torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / f"class{label}" / f"{index}.png")
    return root


def tiny_vit(seed=0, **overrides):
    torch.manual_seed(seed)
    vit = VisionTransformer(**{**CONFIG, **overrides}).eval()
    with torch.no_grad():  # timm zero-initialises these; random values make the comparisons meaningful
        for token in (vit.pos_embed, vit.cls_token, vit.reg_token):
            if token is not None:
                token.normal_(std=0.5)
    return vit


def vit_macs(n_tokens, dim=32, classes=5):
    """MACs per image of CONFIG's one-block ViT, by hand: the patch embedding (3 x 16 x 16 -> dim per token), then
    on the tokens and the class token: qkv (3 dim^2), attention (QK^T and AV: 2 T^2 dim), projection (dim^2), MLP
    (2 x 4 dim^2); the head on the class token."""
    tokens = n_tokens + 1
    return n_tokens * 3 * 16 * 16 * dim + tokens * 12 * dim * dim + 2 * tokens * tokens * dim + dim * classes


# ------------------------------------------------------------------------------------------ the uniform grid
@pytest.mark.parametrize("variant, grids", [
    (dict(), [1, 2, 3, 4, 5]),
    (dict(reg_tokens=2, no_embed_class=True), [3]),
    (dict(img_size=(64, 128)), [(2, 3), (4, 8)]),
])
def test_the_uniform_grid_is_timms_vit_on_the_resized_images(variant, grids):
    vit = tiny_vit(**variant)
    dynamic = VisionTransformer(**{**CONFIG, **variant}, dynamic_img_size=True).eval()
    dynamic.load_state_dict(vit.state_dict())
    height, width = vit.patch_embed.img_size
    quadformer = Quadformer(vit, n_patches=(height // 16) * (width // 16), scorer="pixel-blur")
    images = torch.randn(2, 3, height, width)
    with torch.no_grad():
        for baseline in (UniformGrid(vit), UniformGrid(quadformer)):
            assert baseline.vit is vit  # shared, not copied
            assert {p.data_ptr() for p in baseline.parameters()} == {p.data_ptr() for p in vit.parameters()}
            torch.testing.assert_close(baseline(images), vit(images), rtol=1e-5, atol=1e-5)  # the full grid
            for grid in grids:
                rows, cols = (grid, grid) if isinstance(grid, int) else grid
                resized = F.interpolate(images, size=(16 * rows, 16 * cols), mode="bilinear", align_corners=False,
                                        antialias=True)
                torch.testing.assert_close(baseline(images, grid), dynamic(resized), rtol=1e-5, atol=1e-5)


def test_grid_for_budget_is_the_closest_grid_with_the_images_aspect():
    assert [grid_for_budget(n, (224, 224)) for n in (49, 52, 64, 100, 145, 196)] == \
        [(7, 7), (7, 7), (8, 8), (10, 10), (12, 12), (14, 14)]
    assert grid_for_budget(100, (256, 384)) == (8, 12)
    assert grid_for_budget(8, (64, 128)) == (2, 4) and grid_for_budget(1, (64, 128)) == (1, 2)
    assert grid_for_budget(24, (384, 256)) == (6, 4)
    with pytest.raises(ValueError, match="positive int"):
        grid_for_budget(0, (224, 224))


def test_with_xy_positions_each_token_sits_where_its_region_lies_in_the_image():
    # The 2 x 2 grid of a 64 px image covers the same regions as the Quadformer's four 32 px roots.
    model = Quadformer(tiny_vit(), n_patches=4, scorer="uniform", max_patch_size=32, pos_embed="xy")
    images = torch.randn(2, 3, 64, 64)
    grid, roots = UniformGrid(model).tokenize(images, 2), model.tokenize(images)
    torch.testing.assert_close(grid.centers, roots.centers)
    assert grid.image_size == (64, 64) and grid.tokens.shape == (2, 4, 3, 16, 16)


# ---------------------------------------------------------------------------------------------------- the sweep
def test_a_sweep_over_an_image_folder(image_folder, tmp_path, capsys):
    output = tmp_path / "eval"
    rows = evaluate.main([*CLI_MODEL, "--data", str(image_folder), "--budgets", "1,4,7,16", "--batch-size", "4",
                          "--limit", "8", "--workers", "0", "--warmup", "1", "--timed-batches", "2",
                          "--output", str(output)])
    printed = capsys.readouterr().out
    assert "Not counted" in printed and "images/s" in printed and "uniform" in printed

    assert [(row["budget"], row["method"]) for row in rows] == \
        [(n, method) for n in (1, 4, 7, 16) for method in ("quadformer", "uniform")]
    for method, tokens in (("quadformer", [1, 4, 7, 16]), ("uniform", [1, 4, 9, 16])):
        mine = [row for row in rows if row["method"] == method]
        assert [row["n_patches"] for row in mine] == tokens
        # Pixel-blur is one custom op: no MACs of its own. The rest is the ViT, counted exactly.
        assert [row["gmacs"] for row in mine] == pytest.approx([vit_macs(n) / 1e9 for n in tokens], rel=1e-12)
        assert all(row["scorer_gmacs"] == 0 for row in mine)
    assert [row["grid"] for row in rows if row["method"] == "uniform"] == ["1x1", "2x2", "3x3", "4x4"]
    for row in rows:
        assert 0 <= row["top1"] <= row["top5"] <= 1 and row["n_images"] == 8 and row["batch_size"] == 4
        assert row["images_per_s"] > 0 and row["us_per_image"] == pytest.approx(1e6 / row["images_per_s"])
        assert row["device"] == "cpu" and row["torch"] == torch.__version__
    full = {row["method"]: row for row in rows if row["budget"] == 16}
    assert full["quadformer"]["top1"] == full["uniform"]["top1"]  # both are the plain ViT there

    with (output / "budgets.csv").open() as file:
        table = list(csv.DictReader(file))
    assert len(table) == 8 and list(table[0]) == list(evaluate.COLUMNS) and table[3]["grid"] == "2x2"
    saved = json.loads((output / "budgets.json").read_text())
    assert saved["rows"] == rows and saved["config"]["budgets"] == [1, 4, 7, 16] and "FLOPs / 2" in saved["macs_note"]
    with Image.open(output / "budgets.png") as figure:
        assert figure.format == "PNG" and figure.width > figure.height


def test_the_scorers_macs_are_counted_apart():
    with pytest.warns(UserWarning, match="random"):
        scorer = FeatureBased(min_patch_size=16, max_patch_size=64, random_init=True)
    model = Quadformer(tiny_vit(num_classes=3), n_patches=16, scorer=scorer)
    data = TensorDataset(torch.randn(6, 3, 64, 64), torch.randint(0, 3, (6,)))
    rows = evaluate.evaluate_budgets(model, DataLoader(data, batch_size=4), [4, 16], "cpu", warmup=0,
                                     timed_batches=1, progress=False)
    quadformer, uniform = (row for row in rows if row["budget"] == 4)
    assert quadformer["scorer_gmacs"] > 0 and uniform["scorer_gmacs"] == 0
    assert quadformer["gmacs"] - quadformer["scorer_gmacs"] == pytest.approx(vit_macs(4, classes=3) / 1e9)
    assert uniform["gmacs"] == pytest.approx(vit_macs(4, classes=3) / 1e9, rel=1e-12)
    assert all(row["top5"] is None and row["n_images"] == 6 for row in rows)  # fewer than 5 classes


def test_default_budgets_span_the_range():
    assert evaluate.default_budgets(QuadtreeGeometry(224, 224, 16, 32)) == [49, 85, 121, 160, 196]
    assert evaluate.default_budgets(QuadtreeGeometry(64, 64, 16, 64)) == [1, 4, 7, 13, 16]
    assert evaluate.default_budgets(QuadtreeGeometry(64, 64, 16, 32)) == [4, 7, 10, 13, 16]  # all there are


def test_weights_from_a_plain_vit_a_quadformer_or_a_training_checkpoint(tmp_path):
    source = tiny_vit(seed=1)
    trained = Quadformer(source, n_patches=16)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    torch.save({"model": trained.state_dict(), "epoch": 3}, tmp_path / "train.pth")
    for name in ("vit.pth", "train.pth"):
        model = Quadformer(tiny_vit(seed=2), n_patches=16)
        evaluate.load_weights(model, tmp_path / name)
        for key, value in trained.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (name, key)

    other_classes = Quadformer(tiny_vit(seed=2, num_classes=3), n_patches=16)
    with pytest.raises(RuntimeError, match=r"train.pth: these weights do not fit the Quadformer: .*\(num_classes: 5 "
                                           r"in the weights, 3 in the model\)"):
        evaluate.load_weights(other_classes, tmp_path / "train.pth")
    with pytest.warns(UserWarning, match="vit.head.weight, vit.head.bias left at their random initialisation"):
        evaluate.load_weights(other_classes, tmp_path / "vit.pth", pretrained=True)
    assert torch.equal(other_classes.vit.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)


def test_without_matplotlib_the_plot_is_skipped_with_a_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    row = dict.fromkeys(evaluate.COLUMNS, 0)
    paths = evaluate.write_results([row], tmp_path)
    assert paths["png"] is None and paths["csv"].is_file() and not (tmp_path / "budgets.png").exists()
    assert "pip install matplotlib" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- adaptive budgets
def test_an_adaptive_point_reports_each_images_tokens_macs_at_its_own_length_and_times_the_packed_forward(
        monkeypatch):
    import mixres

    model = Quadformer(tiny_vit(), n_patches=16)
    # From flat to busy, busiest in the top-left quarter: 1 to 16 leaves at this threshold.
    images = torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * \
        torch.linspace(0, 1, 12).view(-1, 1, 1, 1) ** 3
    images[:, :, :32, :32] *= 3
    labels = torch.arange(12) % 5
    threshold = {64: 0.3, 32: 0.6}
    # What the row must state, from tokenize and the model's padded forward.
    lengths = mixres.tokenize(images, model.score(images), 16, 16, 64, threshold=threshold).lengths
    assert len(lengths.unique()) >= 4  # the images get different lengths
    with torch.no_grad():
        model.threshold = threshold
        top1 = (model(images).argmax(dim=1) == labels).double().mean().item()
        model.threshold = None
    packed = []
    monkeypatch.setattr(evaluate, "pack", lambda mosaic: packed.append(mosaic.lengths) or mixres.pack(mosaic))

    loader = DataLoader(TensorDataset(images, labels), batch_size=5)
    rows = evaluate.evaluate_budgets(model, loader, [16], thresholds=[("--threshold", threshold)], warmup=0,
                                     timed_batches=1, progress=False)
    assert [row["method"] for row in rows] == ["quadformer", "uniform", "adaptive"]
    row = rows[2]
    assert (row["budget"], row["n_patches"], row["threshold"], row["source"], row["timed_forward"]) == \
        (16, 16, "64=0.3,32=0.6", "--threshold", "packed")
    assert (row["mean_tokens"], row["min_tokens"], row["max_tokens"]) == \
        (lengths.double().mean().item(), lengths.min().item(), lengths.max().item())
    assert row["top1"] == pytest.approx(top1, abs=1e-12)
    assert row["gmacs"] == pytest.approx(sum(vit_macs(n) for n in lengths.tolist()) / 12 / 1e9, rel=1e-12)
    assert row["gmacs_padded"] == pytest.approx(vit_macs(16) / 1e9, rel=1e-12)
    assert len(packed) == 3 + 1  # the 3 batches, then the timed call (on the first batch)
    assert model.threshold is None  # put back
    assert rows[0]["mean_tokens"] == rows[0]["min_tokens"] == rows[0]["max_tokens"] == 16  # a fixed budget
    assert rows[0]["gmacs"] == rows[0]["gmacs_padded"] == pytest.approx(vit_macs(16) / 1e9, rel=1e-12)
    model.threshold = 0.5
    with pytest.raises(ValueError, match="the model has a threshold"):
        evaluate.evaluate_budgets(model, loader, [16], progress=False)


def test_the_sweep_calibrates_mean_tokens_and_adds_a_training_checkpoints_threshold(image_folder, tmp_path, capsys):
    from mixres.models import create_model

    model = create_model("quadformer_vit_tiny_patch16_224", img_size=64, num_classes=5, embed_dim=32, depth=1,
                         num_heads=2)
    torch.save({"model": model.state_dict(), "args": {"model": "quadformer_vit_tiny_patch16_224", "n_patches": 13},
                "threshold": {64: 0.01, 32: 0.02}}, tmp_path / "last.pt")
    output = tmp_path / "eval"
    rows = evaluate.main([*CLI_MODEL, "--data", str(image_folder), "--budgets", "4", "--batch-size", "4",
                          "--workers", "0", "--warmup", "0", "--timed-batches", "1", "--checkpoint",
                          str(tmp_path / "last.pt"), "--mean-tokens", "7", "10", "--calibration-images", "10",
                          "--output", str(output)])
    printed = capsys.readouterr().out
    assert re.search(r"calibrated on the evaluation images: --mean-tokens 7: threshold \S+ .* over 10 images", printed)
    assert "Their images/s time the packed forward" in printed
    adaptive = [row for row in rows if row["method"] == "adaptive"]
    assert [row["source"] for row in adaptive] == ["checkpoint last.pt", "--mean-tokens 7", "--mean-tokens 10"]
    assert all(row["budget"] == 13 and row["n_images"] == 10 for row in adaptive)  # the checkpoint's cap
    assert adaptive[0]["threshold"] == "64=0.01,32=0.02"
    saved = json.loads((output / "budgets.json").read_text())
    calibrations = saved["config"]["calibrations"]
    # Calibrated on the same 10 images that are evaluated: the rows state the calibration's counts.
    assert len(calibrations) == 2
    for row, calibration in zip(adaptive[1:], calibrations):
        assert (row["mean_tokens"], row["min_tokens"], row["max_tokens"]) == \
            (calibration["mean_tokens"], calibration["min_tokens"], calibration["max_tokens"])
        assert float(row["threshold"]) == calibration["threshold"]
    assert adaptive[1]["mean_tokens"] < adaptive[2]["mean_tokens"]


# ------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("options, message", [
    (["--budgets", "1,5"], r"n_patches=5 is unreachable.*nearest valid: 4 or 7"),
    (["--budgets", "4,many"], "comma-separated integers"),
    (["--data", "no/such/folder"], "no such folder"),
    (["--data", "torch"], "no such folder"),  # not a timm name without its slash: no folder of $MIXRES_DATA read
    (["--model-kwargs", "{depth: 1}"], "not JSON"),
    (["--pretrained-file", "missing.pth"], "no such file"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer from 1"),
    (["--threshold", "0.1", "--mean-tokens", "7"], "argument --mean-tokens: not allowed with argument --threshold"),
    (["--n-patches", "13", "--mean-tokens", "7", "14"], r"--mean-tokens 14 must be from 1 \(the roots: no image has "
                                                         r"fewer leaves\) to 13 \(the cap, --n-patches\)"),
    (["--threshold", "0.1", "64=0.1"], r"--threshold 64=0.1: threshold as a dict must have one entry per splittable "
                                       r"patch size, keys \[64, 32\]"),
    (["--threshold", "nan"], "argument --threshold: expected a finite number"),
])
def test_bad_options_exit_with_a_clear_message(image_folder, tmp_path, capsys, options, message):
    argv = [*CLI_MODEL, "--data", str(image_folder), "--workers", "0", "--output", str(tmp_path), *options]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64])
def test_a_seed_out_of_range_is_a_usage_error(image_folder, tmp_path, capsys, seed):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([*CLI_MODEL, "--data", str(image_folder), "--output", str(tmp_path), "--seed", str(seed)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: argument --seed: expected an integer from 0 to 2**63 - 1, got '{seed}'")


def test_unreadable_images_stop_the_sweep_with_their_name_or_are_left_out(image_folder, tmp_path, capsys):
    from test_data import write_bad

    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    bad = data / "class3" / "bad.png"
    write_bad("corrupt", bad)
    options = [*CLI_MODEL, "--data", str(data), "--budgets", "4,16", "--batch-size", "4", "--workers", "2",
               "--warmup", "0", "--timed-batches", "1"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([*options, "--output", str(tmp_path / "stopped")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: --data: cannot read {bad}: broken data stream when reading image file (--skip-bad-images leaves "
        f"unreadable files out)")

    rows = evaluate.main([*options, "--output", str(tmp_path / "out"), "--skip-bad-images"])
    printed = capsys.readouterr().out
    assert f"skipped 1 unreadable images of 11:\n  cannot read {bad}: broken data stream" in printed
    assert "top-1 over 10 images (1 unreadable ones left out)" in printed
    clean = evaluate.main([*options, "--output", str(tmp_path / "clean"), "--data", str(image_folder)])
    for row, clean_row in zip(rows, clean):  # the same images: the same accuracy
        assert row["n_images"] == clean_row["n_images"] == 10 and row["top1"] == clean_row["top1"]
    saved = json.loads((tmp_path / "out" / "budgets.json").read_text())["config"]["unreadable_skipped"]
    assert saved == [f"cannot read {bad}: broken data stream when reading image file"]


def test_the_command_exits_non_zero(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mixres.evaluate", *CLI_MODEL, "--data", str(tmp_path / "none"),
                             "--output", str(tmp_path)], capture_output=True, text=True, timeout=HANG_TIMEOUT,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 2 and "no such folder" in result.stderr
