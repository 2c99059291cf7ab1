"""The demo, run in-process on a small batch: its files, and leaves that partition each photo."""
import json

import pytest
import torch
from PIL import Image

pytest.importorskip("skimage")

from mixres import demo  # noqa: E402  (after the skip: the demo needs scikit-image)
from mixres.pyramid import QuadtreeGeometry  # noqa: E402


def test_demo_writes_figures_and_leaves(tmp_path, capsys):
    report = demo.main(["--out", str(tmp_path / "demo"), "--batch", "4", "--repeats", "1", "--n-patches", "100"])
    printed = capsys.readouterr().out
    assert "cpu" in printed and "images/s" in printed

    assert [photo["name"] for photo in report["photos"]] == list(demo.PHOTOS)
    for photo in report["photos"]:
        leaves_file = tmp_path / "demo" / f"{photo['name']}.json"
        with Image.open(tmp_path / "demo" / f"{photo['name']}.png") as figure:
            assert figure.height == photo["size"][0] and figure.width > 2 * photo["size"][1]
        record = json.loads(leaves_file.read_text())
        height, width = record["height"], record["width"]
        assert height % 64 == 0 and width % 64 == 0 and min(height, width) == 256
        geometry = QuadtreeGeometry(height, width, record["min_patch_size"], record["max_patch_size"])
        assert record["n_patches"] in geometry.valid_n_patches() and abs(record["n_patches"] - 100) <= 1
        assert len(record["leaves"]) == record["n_patches"]
        assert sum(photo["leaves_per_size"].values()) == record["n_patches"]

        cover = torch.zeros(height, width, dtype=torch.int32)
        for y, x, size in record["leaves"]:
            assert size in geometry.sizes and y % size == 0 and x % size == 0
            cover[y:y + size, x:x + size] += 1
        assert (cover == 1).all(), f"{photo['name']}: leaves overlap or leave gaps"

    with Image.open(tmp_path / "demo" / "scorers.png") as comparison:
        assert comparison.width > 3 * 384 and comparison.height > 2 * 256
    assert len(report["scorers"]) == 6 and any("random weights" in caption for caption in report["scorers"])
    rocket_budget = sum(report["scorers"]["PixelBlur"].values())
    assert all(sum(per_size.values()) == rocket_budget for per_size in report["scorers"].values())

    rates = report["throughput"]
    assert all(rates[key] > 0 for key in ("tokenize", "reference", "pixel-blur"))


def test_nearest_valid_n_patches():
    geometry = QuadtreeGeometry(256, 384)  # 24 roots, at most 384 leaves
    assert demo.nearest_valid_n_patches(geometry, 128) == 129
    assert demo.nearest_valid_n_patches(geometry, 1) == 24
    assert demo.nearest_valid_n_patches(geometry, 10_000) == 384
