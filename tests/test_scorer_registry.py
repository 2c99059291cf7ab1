"""mixres.create_scorer: every scorer by name, with its own arguments; a built scorer passes through."""
import pytest
import torch
from torch import nn

import mixres
from mixres.scorers import SCORERS, Entropy, FeatureBased, GradCAM, PixelBlur, Precomputed, Random, Uniform


def test_every_scorer_by_name_with_its_arguments():
    images = torch.rand(2, 3, 64, 128)
    classifier = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    built = {
        "pixel-blur": mixres.create_scorer("pixel-blur", 8, 32),
        "entropy": mixres.create_scorer("Entropy", 8, 32, bins=8),
        "random": mixres.create_scorer("random", 8, 32, seed=3),
        "uniform": mixres.create_scorer("UNIFORM", 8, 32),
        "precomputed": mixres.create_scorer("precomputed", 8, 32, saliency=torch.rand(2, 8, 16)),
        "gradcam": mixres.create_scorer("gradcam", 8, 32, model=classifier),
    }
    with pytest.warns(UserWarning, match="randomly initialised"):
        built["feature"] = mixres.create_scorer("feature", 8, 32, random_init=True)
    assert sorted(built) == sorted(SCORERS)
    kinds = {"pixel-blur": PixelBlur, "entropy": Entropy, "random": Random, "uniform": Uniform,
             "precomputed": Precomputed, "gradcam": GradCAM, "feature": FeatureBased}
    for name, scorer in built.items():
        assert type(scorer) is kinds[name]
        assert (scorer.min_patch_size, scorer.max_patch_size) == (8, 32)
        assert [m.shape for m in scorer(images)] == [(2, 2, 4), (2, 4, 8)], name
    assert built["entropy"].bins == 8 and built["random"].seed == 3
    assert type(mixres.create_scorer("pixel_blur")) is PixelBlur  # '_' for '-'


def test_a_built_scorer_passes_through_when_its_sizes_agree():
    scorer = PixelBlur(8, 32)
    assert mixres.create_scorer(scorer, 8, 32) is scorer
    with pytest.raises(ValueError, match="8-32 px.*16-64 px"):
        mixres.create_scorer(scorer)
    with pytest.raises(TypeError, match="already built"):
        mixres.create_scorer(scorer, 8, 32, seed=1)


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match="unknown: choose one of pixel-blur, feature"):
        mixres.create_scorer("saliency")
    with pytest.raises(TypeError, match="must be a name"):
        mixres.create_scorer(3)
    with pytest.raises(TypeError, match="seed"):
        mixres.create_scorer("uniform", seed=1)
    with pytest.raises(ValueError, match="needs weights"):
        mixres.create_scorer("feature")
