"""The scorers on a real photo: scikit-image's rocket (256x384 here), whose top half is mostly clear evening sky.

A content-aware scorer must spend its splits on the subject (the rocket, the launch towers, the lights, the
horizon) and leave the flat sky in large leaves. Random and Uniform are the controls: they see no content, so the
same statistic must not separate the sky from the rest for them.

FeatureBased and GradCAM are not here: their claim rests on pretrained weights, which cannot be downloaded where
the tests run. (A randomly initialised ShuffleNet does favour the subject too, but by a ratio from 1.4 to 1.9
depending on the seed, over torch seeds 0-4: that says nothing about the scorer.)
"""
import re
from pathlib import Path

import pytest

import mixres
from mixres.apps.demo import top_half_leaves
from mixres.scorers import Entropy, PixelBlur, Random, Uniform

pytest.importorskip("skimage")

N_PATCHES = 129  # 24 roots of 64 px + 35 splits: about a third of the most (384), as in `make demo`


@pytest.fixture(scope="module")
def rocket():
    from mixres.apps.demo import load_photo

    return load_photo("rocket")[None]  # [1, 3, 256, 384]


def sky_leaves(photo, scorer) -> dict:
    """The demo's statistic of the top half (the sky): the number of its leaves and their mean side, and the mean
    side of the others."""
    return top_half_leaves(mixres.tokenize(photo, scorer, n_patches=N_PATCHES).boxes[0], photo.shape[-2])


def sky_and_ground_leaves(photo, scorer):
    """(number of sky leaves, mean side of a sky leaf / mean side of any other leaf)."""
    sky = sky_leaves(photo, scorer)
    return sky["top_leaves"], sky["top_mean_side"] / sky["bottom_mean_side"]


# The launch towers at the left and right edges reach into the sky, so its mean side stays below 64 px.
@pytest.mark.parametrize("scorer", [PixelBlur(16, 64), Entropy(16, 64)], ids=repr)
def test_the_sky_gets_larger_leaves_than_the_subject(rocket, scorer):
    n_sky, ratio = sky_and_ground_leaves(rocket, scorer)
    assert ratio > 1.5
    assert n_sky < N_PATCHES - n_sky


def test_random_scores_do_not_tell_the_sky_from_the_subject(rocket):
    # Measured over seeds 0-4: ratios 1.06, 0.94, 0.95, 1.00, 0.85 (mean 0.96), with 60 to 75 sky leaves.
    ratios = [sky_and_ground_leaves(rocket, Random(16, 64, seed=seed))[1] for seed in range(5)]
    assert 0.8 < sum(ratios) / len(ratios) < 1.2


def test_uniform_scores_split_the_top_rows_first(rocket):
    # Ties go to the first leaf in raster order, so a uniform score refines the sky first, whatever is in it:
    # measured 117 sky leaves of 18.3 px against 12 leaves of 64 px below.
    n_sky, ratio = sky_and_ground_leaves(rocket, Uniform(16, 64))
    assert ratio < 0.5
    assert n_sky > N_PATCHES - n_sky


README_SKY = re.compile(r"On this photo PixelBlur puts (\d+) of its (\d+) leaves in the sky \(the top half\), with a "
                        r"mean side of (\d+) px against (\d+) px below; Entropy puts (\d+) there, of (\d+) px against "
                        r"(\d+) px")


def test_the_readme_states_the_sky_figures_that_the_demo_prints(rocket):
    # Exact, not approximate: the figures are counts and means of whole leaves, so they change only if a greedy
    # split does. Across CPU kernels the photo's resize differs by up to 1.8e-7 per pixel (AVX2 vs
    # ATEN_CPU_CAPABILITY=default), which moves PixelBlur's scores by under 1e-6 of their value (as does float64),
    # and no grey level lies within 1e-7 of one of Entropy's bin edges. At each of the 35 splits the best leaf beats
    # the runner-up by at least 2.6e-4 of its score (PixelBlur; 1.1e-3 for Entropy). The leaves were identical with
    # the default kernels, OMP_NUM_THREADS=1, ATEN_CPU_CAPABILITY=default and ONEDNN_MAX_CPU_ISA=SSE41. The means
    # round far from a half: 37.33 and 20.69 px (PixelBlur), 44.19 and 19.56 px (Entropy).
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    stated = README_SKY.search(readme)
    assert stated, "README.md no longer words the rocket's sky figures as this test reads them"
    pixel_blur_sky, n_patches, *figures = map(int, stated.groups())
    assert n_patches == N_PATCHES
    for scorer, (n_sky, sky_side, ground_side) in ((PixelBlur(16, 64), (pixel_blur_sky, *figures[:2])),
                                                  (Entropy(16, 64), figures[2:])):
        measured = sky_leaves(rocket, scorer)
        assert (measured["top_leaves"], round(measured["top_mean_side"]), round(measured["bottom_mean_side"])) \
            == (n_sky, sky_side, ground_side), scorer
