"""FeatureBased, the feature-based scorer: pyramid layout, an independent per-patch oracle, backbones and weights.

No weights can be downloaded here: backbones are seeded random ones, or weights files the tests write themselves.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import mixres
from mixres.scorers.features import FeatureBased

from helpers import captured_in_cuda_graph

MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(3, 1, 1)


def random_scorer(backbone="shufflenet_v2_x0_5", seed=0, **kwargs) -> FeatureBased:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-backbone warning, tested on its own
        return FeatureBased(backbone, random_init=True, **kwargs)


def make_images(batch=2, channels=3, height=64, width=128, seed=0):
    """Random pixels next to a flat band, so that scores differ from patch to patch and show any misplacement."""
    images = torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))
    images[:, :, :, : width // 4] = 0.5
    return images


class TinyNet(nn.Module):
    """A stride-4 backbone that returns a feature pyramid, as detection backbones do: the scorer takes the last."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, images):
        first = F.relu(self.conv1(images))
        return [first, self.conv2(first)]


def per_patch_feature_scores(backbone, images, min_patch_size, max_patch_size, normalize=True, autocast_dtype=None):
    """The oracle: docs/design.md's definition in float64, one blurred image through the backbone at a time, one
    candidate patch at a time: the mean of the importance map over the patch's cells where the map is at least as
    fine as the patch, else the map's bilinear sample at the patch's centre. With ``autocast_dtype``, the backbone
    alone runs in float32 under ``torch.autocast`` (which leaves float64 alone), on the float64 input rounded to
    float32, and its features are widened back."""
    backbone = copy.deepcopy(backbone).eval()
    backbone = backbone.double() if autocast_dtype is None else backbone.float()
    images = images.double()
    batch, _, height, width = images.shape

    def features(image):
        image = (image - MEAN) / STD if normalize else image
        with torch.autocast(image.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            output = backbone(image if autocast_dtype is None else image.float())
        output = output[-1] if isinstance(output, (list, tuple)) else output
        return output.double()

    def bilinear_sample(grid, y, x):  # align_corners=False coordinates, clamped at the border as F.interpolate does
        y, x = min(max(y, 0.0), grid.shape[0] - 1), min(max(x, 0.0), grid.shape[1] - 1)
        y0, x0 = int(y), int(x)
        y1, x1 = min(y0 + 1, grid.shape[0] - 1), min(x0 + 1, grid.shape[1] - 1)
        wy, wx = y - y0, x - x0
        return ((1 - wy) * ((1 - wx) * grid[y0, x0] + wx * grid[y0, x1])
                + wy * ((1 - wx) * grid[y1, x0] + wx * grid[y1, x1]))

    pyramid, size = [], max_patch_size
    while size > min_patch_size:
        factor = size // min_patch_size
        scores = torch.empty(batch, height // size, width // size, dtype=torch.float64)
        for b in range(batch):
            image = images[b:b + 1]
            small = F.interpolate(image, size=(height // factor, width // factor), mode="bilinear",
                                  align_corners=False)
            blurred = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
            importance = ((features(blurred) - features(image)) ** 2).mean(dim=1)[0]  # [h, w]
            stride = height // importance.shape[0]
            for row in range(height // size):
                for col in range(width // size):
                    if size >= stride:
                        cells = size // stride
                        scores[b, row, col] = importance[row * cells:(row + 1) * cells,
                                                         col * cells:(col + 1) * cells].mean()
                    else:
                        scores[b, row, col] = bilinear_sample(importance, (row + 0.5) * size / stride - 0.5,
                                                              (col + 0.5) * size / stride - 0.5)
        pyramid.append(scores)
        size //= 2
    return pyramid


def test_default_backbone_is_a_truncated_shufflenet():
    scorer = random_scorer()
    assert sum(p.numel() for p in scorer.backbone.parameters()) == pytest.approx(0.34e6, rel=0.02)
    assert scorer.backbone(torch.rand(1, 3, 64, 96)).shape == (1, 1024, 2, 3)  # conv5 kept, stride 32
    assert repr(scorer) == "FeatureBased(backbone='shufflenet_v2_x0_5', min_patch_size=16, max_patch_size=64)"


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_truncation_keeps_exactly_what_the_classifier_reads(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    trunk = random_scorer(name).backbone
    assert not trunk.load_state_dict(model.state_dict(), strict=False).missing_keys
    first_linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    read = []
    first_linear.register_forward_hook(lambda module, inputs, output: read.append(inputs[0]))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        model(images)
        # Each of these classifiers pools globally, then reads the pooled features with its first linear layer.
        torch.testing.assert_close(trunk(images).mean(dim=(2, 3)), read[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_pyramid_shapes_dtype_device(dtype):
    images = make_images(height=128, width=192).to(dtype)
    pyramid = random_scorer(min_patch_size=16, max_patch_size=64)(images)
    assert [tuple(m.shape) for m in pyramid] == [(2, 2, 3), (2, 4, 6)]
    assert all(m.dtype == torch.float32 and m.device == images.device for m in pyramid)
    assert all(torch.isfinite(m).all() and (m >= 0).all() for m in pyramid)


def test_equal_sizes_give_an_empty_pyramid():
    assert random_scorer(min_patch_size=32, max_patch_size=32)(torch.rand(1, 3, 64, 64)) == []


@pytest.mark.parametrize("make_scorer, channels", [
    # Stride 32 against patches of 64, 32 and 16 px: the map is pooled, used as is, and resampled.
    (lambda: random_scorer(min_patch_size=8, max_patch_size=64), 3),
    # Stride 4, finer than every level: pooled. One channel, not normalised.
    (lambda: FeatureBased(TinyNet(1), normalize=False, min_patch_size=8, max_patch_size=64), 1),
], ids=["shufflenet", "tiny"])
def test_matches_per_patch_oracle(make_scorer, channels):
    torch.manual_seed(0)
    scorer = make_scorer()
    images = make_images(channels=channels)
    got = scorer(images)
    want = per_patch_feature_scores(scorer.backbone, images, 8, 64, scorer.normalize)
    assert [tuple(m.shape) for m in got] == [(2, 1, 2), (2, 2, 4), (2, 4, 8)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5 * w.abs().max().item())
    assert all(m.std() > 0 for m in got)  # the scores do vary, so misplacement would show


def test_deterministic_and_without_gradients():
    scorer = random_scorer()
    images = make_images(height=128, width=128).requires_grad_()
    first, second = scorer(images), scorer(images.detach().clone())
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not any(m.requires_grad for m in first)


@pytest.mark.parametrize("dtype, tolerance", [
    # Measured, as a fraction of each level's largest score, on an AVX2 CPU with 1 and 2 threads, also with
    # ATEN_CPU_CAPABILITY=default and ONEDNN_MAX_CPU_ISA=SSE41: the scorer is 4.8e-4 and 1.5e-4 (bfloat16), 2e-5
    # to 1.3e-4 (float16) from the oracle that runs the backbone under autocast, where a low-precision rounding
    # that goes the other way, for a one-ulp different input or another summation order, moves a feature by an
    # ulp; the float32 scorer is 1.0e-2 and 1.4e-2 (bfloat16), 2.5e-3 and 3.3e-3 (float16) from that oracle, and
    # 4e-7 from the float64 one. The tolerances sit 4x above the first and 5x below the second.
    (torch.bfloat16, 2e-3),
    (torch.float16, 5e-4),
])
def test_autocast_runs_the_backbone_in_low_precision(dtype, tolerance):
    images = make_images(height=128, width=128)
    scorer = random_scorer(autocast_dtype=dtype)
    convolved = []
    handles = [module.register_forward_hook(lambda module, inputs, output: convolved.append(output.dtype))
               for module in scorer.backbone.modules() if isinstance(module, nn.Conv2d)]
    got = scorer(images)
    for handle in handles:
        handle.remove()  # before the oracle copies the backbone
    assert convolved and set(convolved) == {dtype}
    want = per_patch_feature_scores(scorer.backbone, images, 16, 64, autocast_dtype=dtype)
    full = random_scorer()(images)  # same seed, same weights
    for g, w, f in zip(got, want, full, strict=True):
        assert g.dtype == torch.float32
        largest = w.abs().max().item()
        torch.testing.assert_close(g.double(), w, rtol=0, atol=tolerance * largest)
        # The tolerance tells autocast from float32: a scorer that ignored autocast_dtype would fail.
        assert (f.double() - w).abs().max() > 4 * tolerance * largest


def calibrated(backbone: nn.Module, seed: int = 0) -> nn.Module:
    """The backbone with BatchNorm statistics of random images and random affine parameters, as a trained network
    has: its activations neither vanish nor explode, so that its scores are well above float32 rounding, and
    folding the BatchNorms is no no-op."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # the plain average over the batches
                module.weight.copy_(torch.empty_like(module.weight).uniform_(0.5, 1.5, generator=generator))
                module.bias.copy_(torch.empty_like(module.bias).uniform_(-0.2, 0.2, generator=generator))
        backbone.train()(torch.rand(8, 3, 128, 128, generator=generator))
    return backbone.eval()


@pytest.mark.parametrize("backbone", ["shufflenet_v2_x0_5", "resnet18", "mobilenet_v3_small", "timm:resnet18"])
def test_prepared_copy_matches_the_oracle_within_the_documented_tolerance(backbone):
    """The images go through a copy with the BatchNorms folded and channels-last weights: as close to the float64
    oracle as float32 gets. Measured on an AVX2 CPU, as a fraction of each level's largest score: 6e-7 to 1.1e-6
    (ShuffleNetV2, ResNet-18), 6.3e-6 (MobileNetV3; the backbone as given is 3.8e-6 away); 2e-5 is 3x above."""
    scorer = random_scorer(backbone, min_patch_size=32, max_patch_size=64)
    calibrated(scorer.backbone)
    images = make_images(height=128, width=128)
    got = scorer(images)
    want = per_patch_feature_scores(scorer.backbone, images, 32, 64)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=2e-5 * w.abs().max().item())


def test_default_backbone_runs_without_batch_norm_and_with_its_hooks(monkeypatch):
    """The default backbone's BatchNorms are folded into its convolutions: none runs. A hook on the backbone makes
    the scorer use the backbone itself, so that the hook sees every call."""
    scorer = random_scorer(min_patch_size=16, max_patch_size=32)
    calibrated(scorer.backbone)
    images = make_images(height=64, width=64)
    batch_norms = []
    original = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda *args, **kwargs: batch_norms.append(1) or original(*args, **kwargs))
    prepared = scorer(images)
    assert batch_norms == []
    seen = []
    handle = scorer.backbone.conv1.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    as_given = scorer(images)
    handle.remove()
    assert seen == [(2 * 2, 24, 32, 32)] and len(batch_norms) > 0  # the original and the blurred images, once
    torch.testing.assert_close(prepared[0], as_given[0], rtol=0, atol=2e-5 * as_given[0].abs().max().item())


def test_prepared_copy_follows_changes_to_the_backbone():
    """Weights loaded in place, a tensor replaced, and the backbone converted to another dtype: each call scores
    with the backbone as it is then, as a new scorer on the same weights does."""
    scorer = random_scorer(seed=0, min_patch_size=32, max_patch_size=64)
    images = make_images(height=64, width=128)
    before = scorer(images)
    other = calibrated(random_scorer(seed=1).backbone, seed=1)
    scorer.backbone.load_state_dict(other.state_dict())  # in place
    fresh = FeatureBased(copy.deepcopy(other), min_patch_size=32, max_patch_size=64)
    assert all(torch.equal(a, b) for a, b in zip(scorer(images), fresh(images), strict=True))
    assert not torch.equal(scorer(images)[0], before[0])
    with torch.no_grad():
        weight = scorer.backbone.conv5[0].weight
        scorer.backbone.conv5[0].weight = nn.Parameter(weight * 2)  # replaced
        fresh.backbone.conv5[0].weight.mul_(2)
    assert all(torch.equal(a, b) for a, b in zip(scorer(images), fresh(images), strict=True))
    scorer.backbone.double()
    want = per_patch_feature_scores(scorer.backbone, images, 32, 64)
    for g, w in zip(scorer(images), want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=0, atol=2e-5 * w.abs().max().item())


def test_compiles_with_the_backbone_as_given():
    """Under torch.compile the scorer runs the backbone itself (dynamo traces it, and needs no copy), with the same
    scores."""
    torch.manual_seed(0)
    backbone = calibrated(nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.Conv2d(8, 16, 3, stride=4, padding=1)))
    scorer = FeatureBased(backbone, min_patch_size=16, max_patch_size=32)
    images = make_images(height=64, width=64)
    torch._dynamo.reset()
    compiled = torch.compile(scorer.__call__, backend="aot_eager", fullgraph=True)
    got, want = compiled(images), per_patch_feature_scores(scorer.backbone, images, 16, 32)
    torch.testing.assert_close(got[0].double(), want[0], rtol=0, atol=2e-5 * want[0].abs().max().item())
    assert scorer._prepared is None  # dynamo traced the backbone as given


def test_tokenize_calls_it_and_reads_its_sizes():
    scorer = random_scorer(min_patch_size=8, max_patch_size=32)
    images = make_images(height=64, width=96)
    mosaic = mixres.tokenize(images, scorer, n_patches=30)
    assert mosaic.boxes.shape == (2, 30, 3) and mosaic.tokens.shape == (2, 30, 3, 8, 8)
    assert torch.equal(mosaic.boxes, mixres.tokenize(images, scorer(images), 30, min_patch_size=8,
                                                     max_patch_size=32).boxes)


def test_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    model = torchvision.models.get_model("shufflenet_v2_x0_5").eval()
    for module in model.modules():  # running statistics away from their 0 and 1 defaults, so they count too
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    images = make_images(height=128, width=128)
    # The full classifier without its fc layer, by hand: the truncation, independently.
    want = FeatureBased(nn.Sequential(*list(model.children())[:-1]))(images)
    for wrapped in (lambda state: state, lambda state: {"state_dict": state}, lambda state: {"model": state}):
        path = tmp_path / "shufflenet.pt"
        torch.save(wrapped(model.state_dict()), path)
        got = FeatureBased(weights=path)(images)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert not torch.equal(random_scorer()(images)[0], want[0])
    # A file also loads into an nn.Module backbone: here the truncated state dict, into a fresh shufflenet trunk.
    torch.save(FeatureBased(weights=path).backbone.state_dict(), tmp_path / "trunk.pt")
    got = FeatureBased(random_scorer(seed=2).backbone, weights=tmp_path / "trunk.pt")(images)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_wrong_weights_files_are_named(tmp_path):
    torch.save(torchvision.models.get_model("resnet18").state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(ValueError, match=r"resnet18.pt' does not fit backbone 'shufflenet_v2_x0_5': it lacks \d+ "
                                         r"of the backbone's \d+ keys, such as \['conv1.0.weight'"):
        FeatureBased(weights=tmp_path / "resnet18.pt")
    torch.save(torchvision.models.get_model("shufflenet_v2_x1_0").state_dict(), tmp_path / "x1_0.pt")
    with pytest.raises(ValueError, match=r"fit backbone.*differ in shape.*'stage2.0.branch1.2.weight: "
                                         r"\[58, 24, 1, 1\] in the file, \[24, 24, 1, 1\] in the backbone'"):
        FeatureBased(weights=tmp_path / "x1_0.pt")
    module = TinyNet(3)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match="does not fit backbone 'TinyNet'"):
        FeatureBased(module, weights=tmp_path / "resnet18.pt")
    assert all(torch.equal(before[key], value) for key, value in module.state_dict().items())  # left as it was
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="must hold a state dict"):
        FeatureBased(weights=tmp_path / "tensor.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a PyTorch state dict"):
        FeatureBased(weights=tmp_path / "text.pt")


def test_weights_must_be_chosen_and_random_ones_warned_about():
    with pytest.raises(ValueError, match="weights='DEFAULT'.*random_init=True"):
        FeatureBased()
    with pytest.warns(UserWarning, match="randomly initialised.*not meaningful"):
        FeatureBased(random_init=True)
    with pytest.raises(ValueError, match="random_init=True contradicts"):
        FeatureBased(weights="DEFAULT", random_init=True)
    with pytest.raises(ValueError, match="needs a backbone name"):
        FeatureBased(TinyNet(3), weights="DEFAULT")


@pytest.mark.parametrize("name", ["timm:resnet18", "resnet10t"])  # prefixed, and a name only timm knows
def test_timm_features_only_backbone(name):
    import timm

    scorer = random_scorer(name, min_patch_size=8, max_patch_size=32)
    assert isinstance(scorer.backbone, timm.models.FeatureListNet)
    assert repr(scorer).startswith(f"FeatureBased(backbone={name!r}")
    images = make_images(height=64, width=96)
    pyramid = scorer(images)
    assert [tuple(m.shape) for m in pyramid] == [(2, 2, 3), (2, 4, 6)]
    assert all(torch.isfinite(m).all() and m.max() > 0 for m in pyramid)


def test_custom_module_backbone():
    torch.manual_seed(0)
    scorer = FeatureBased(TinyNet(3), min_patch_size=16, max_patch_size=64)
    assert repr(scorer) == "FeatureBased(backbone='TinyNet', min_patch_size=16, max_patch_size=64)"
    pyramid = scorer(make_images(height=128, width=64))
    assert [tuple(m.shape) for m in pyramid] == [(2, 2, 1), (2, 4, 2)]
    # One that does not return a feature map is named.
    with pytest.raises(ValueError, match=r"backbone 'Flatten' must map images .* to a feature map.*got \[6, 12288\]"):
        FeatureBased(nn.Flatten())(torch.rand(2, 3, 64, 64))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="neither a torchvision classification model .* nor a timm model"):
        FeatureBased("no_such_net", random_init=True)
    with pytest.raises(TypeError, match="backbone must be a torchvision or timm model name or an nn.Module"):
        FeatureBased(3, random_init=True)
    with pytest.raises(ValueError, match="autocast_dtype must be None, torch.bfloat16 or torch.float16"):
        FeatureBased(TinyNet(3), autocast_dtype=torch.float64)
    with pytest.raises(ValueError, match="power of two"):
        FeatureBased(TinyNet(3), min_patch_size=16, max_patch_size=48)
    with pytest.raises(ValueError, match="4 channels: pass normalize=False"):
        FeatureBased(TinyNet(4))(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="multiple of max_patch_size"):
        FeatureBased(TinyNet(3))(torch.rand(1, 3, 100, 64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_moves_the_backbone_once_and_matches_cpu():
    scorer = random_scorer()
    images = make_images(height=128, width=128)
    on_cpu = scorer(images)
    on_cuda = scorer(images.cuda())
    assert all(m.device.type == "cuda" for m in on_cuda)
    assert next(scorer.backbone.parameters()).is_cuda
    for c, g in zip(on_cpu, on_cuda, strict=True):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-3, atol=1e-3 * c.abs().max().item())
    torch.testing.assert_close(scorer(images.cuda())[0], on_cuda[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=str)
def test_cuda_graph_capture_replays_the_scores(autocast_dtype):
    """Nothing in a call copies from the host or waits for the device once the scorer has run on the device: it
    can be captured in a CUDA graph, whose replays score new images."""
    scorer = random_scorer(autocast_dtype=autocast_dtype)
    first, second = make_images(height=128, width=128, seed=1).cuda(), make_images(height=128, width=128, seed=2).cuda()
    static = first.clone()
    # The warm-up call moves the backbone, prepares its copy and the normalisation constants.
    graph, outputs = captured_in_cuda_graph(lambda: scorer(static))
    for images in (second, first):
        static.copy_(images)
        graph.replay()
        for replayed, eager in zip(outputs, scorer(images), strict=True):
            torch.testing.assert_close(replayed, eager, rtol=0, atol=0)
