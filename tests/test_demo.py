"""The demo, run in-process on a small batch: its files, and leaves that partition each photo."""
import json
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("skimage")

from mixres.apps import demo, fitting  # noqa: E402  (after the skip: the demo needs scikit-image)
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
    # The sky statistic that README.md quotes (tests/test_scorer_photos.py checks the figures), for every scorer.
    assert report["top_half"].keys() == report["scorers"].keys()
    for caption, top in report["top_half"].items():
        assert 0 < top["top_leaves"] < rocket_budget and 16 <= top["top_mean_side"] <= 64
        assert f"sky: {top['top_leaves']}, {top['top_mean_side']:.1f} px vs {top['bottom_mean_side']:.1f} px" \
            in printed, caption

    rates = report["throughput"]
    assert all(rates[key] > 0 for key in ("tokenize", "reference", "pixel-blur"))


def test_nearest_valid_n_patches():
    geometry = QuadtreeGeometry(256, 384)  # 24 roots, at most 384 leaves
    assert fitting.nearest_valid_n_patches(geometry, 128) == 129
    assert fitting.nearest_valid_n_patches(geometry, 1) == 24
    assert fitting.nearest_valid_n_patches(geometry, 10_000) == 384


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), levels=st.integers(0, 3),
       target=st.one_of(st.integers(-10, 3000), st.floats(-10, 3000, allow_nan=False)))
def test_nearest_valid_n_patches_is_the_closest_of_the_list(rows, cols, levels, target):
    geometry = QuadtreeGeometry(rows * 32, cols * 32, 32 >> levels, 32)
    valid = range(geometry.n_roots, geometry.max_patches + 1, 3)  # the definition: roots + 3k up to the full grid
    assert fitting.nearest_valid_n_patches(geometry, target) == min(valid, key=lambda n: (abs(n - target), n))


def test_nearest_valid_n_patches_of_a_huge_geometry_is_computed():
    geometry = QuadtreeGeometry(2**30, 2**30, 1, 2**30)  # 4**30 leaves at most: a list of them would not fit
    third = fitting.nearest_valid_n_patches(geometry, geometry.max_patches / 3)
    assert (third - 1) % 3 == 0 and abs(Fraction(third) - Fraction(geometry.max_patches / 3)) <= Fraction(3, 2)
    assert fitting.nearest_valid_n_patches(geometry, 1 + 3 * 12345678901234567) == 1 + 3 * 12345678901234567
    assert fitting.nearest_valid_n_patches(geometry, 2 + 3 * 12345678901234567) == 1 + 3 * 12345678901234567
    assert fitting.nearest_valid_n_patches(geometry, 10**30) == 4**30


@pytest.mark.parametrize("size, multiple, short_side, fitted", [
    ((100, 150), 64, None, (128, 128)), ((200, 96), 64, None, (192, 128)), ((10, 10), 64, None, (64, 64)),
    ((100, 150), 32, 64, (64, 96)), ((1000, 1000), 64, None, (1024, 1024)),
])
def test_fitted_size_is_what_fit_to_multiple_gives(size, multiple, short_side, fitted):
    assert fitting.fitted_size(*size, multiple, short_side) == fitted
    assert fitting.fit_to_multiple(torch.rand(3, *size), multiple, short_side).shape[1:] == fitted


def test_top_half_leaves_counts_the_leaves_centred_above_the_middle():
    # 128 rows: two 64 px leaves, then 16 and 32 px leaves whose centres fall at rows 56, 120 and exactly 64.
    boxes = torch.tensor([[0, 0, 64], [64, 0, 64], [48, 64, 16], [112, 64, 16], [48, 96, 32]], dtype=torch.int32)
    assert demo.top_half_leaves(boxes, 128) == {"top_leaves": 2, "top_mean_side": 40.0,
                                                "bottom_mean_side": (64 + 16 + 32) / 3}
