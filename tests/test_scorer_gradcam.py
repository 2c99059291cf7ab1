"""GradCAM, the Grad-CAM oracle scorer: against Grad-CAM computed by hand, labels, the default target layer of
torchvision and timm models, what scoring leaves of the model, and the tokenizer's use of it."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import mixres
from mixres.scorers.gradcam import GradCAM

from helpers import raising_on_host_sync

timm = pytest.importorskip("timm")

N_CLASSES = 5


def tiny_cnn(seed=0):
    """conv-relu-conv(stride 2)-relu-avgpool-linear; in-place ReLUs overwrite the conv outputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, N_CLASSES))


def vit(img_size=64, **kwargs):
    torch.manual_seed(0)
    return timm.models.VisionTransformer(img_size=img_size, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                         num_classes=N_CLASSES, **kwargs)


def torchvision_vit(image_size=64):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=image_size, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=N_CLASSES)
    nn.init.normal_(model.heads.head.weight)  # torchvision zeroes the head: every logit, and gradient, would be 0
    return model


def swin(img_size=64):
    torch.manual_seed(0)
    return timm.models.SwinTransformer(img_size=img_size, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                                       num_heads=(1, 1), num_classes=N_CLASSES)


def patch_sums(cams, height, width, min_patch_size, max_patch_size):
    """The oracle's aggregation: each patch's sum of the map ``[B, h, w]`` (h | H/min_patch_size), in units of one
    min_patch_size cell, i.e. divided by the map pixels per cell."""
    batch, h, w = cams.shape
    cell = min_patch_size * h // height
    pyramid, size = [], max_patch_size
    while size > min_patch_size:
        side = size * h // height
        scores = torch.empty(batch, height // size, width // size, dtype=cams.dtype)
        for row in range(height // size):
            for col in range(width // size):
                scores[:, row, col] = cams[:, row * side:(row + 1) * side, col * side:(col + 1) * side].sum((1, 2))
        pyramid.append(scores / cell ** 2)
        size //= 2
    return pyramid


def analytic_cam(model, images, labels):
    """Target "3" (the last ReLU) of tiny_cnn: logit_c = sum_k W[c, k] * mean(A_k) + b_c, so dlogit_c/dA_k is
    W[c, k] / (h w) everywhere."""
    with torch.no_grad():
        activations = model[:4](images)
    weights = model[6].weight[labels] / activations[0, 0].numel()
    return torch.relu(torch.einsum("bk,bkhw->bhw", weights, activations))


def per_image_autograd_cam(head, tail, images, labels):
    """Grad-CAM with plain autograd, one image at a time: ``head(image [1, C, H, W])`` gives the target layer's
    activations as a feature map ``[1, K, h, w]`` and whatever else ``tail`` needs (the prefix tokens of a ViT);
    ``tail(feature_map, rest)`` gives the logits, from the feature map made a leaf."""
    cams = []
    for image, label in zip(images, labels):
        with torch.no_grad():
            activations, rest = head(image[None])
        activations = activations.detach().requires_grad_()
        (gradient,) = torch.autograd.grad(tail(activations, rest)[0, label], activations)
        cams.append(torch.relu((gradient.mean((2, 3), keepdim=True) * activations.detach()).sum(1))[0])
    return torch.stack(cams)


def split_sequential(model, split):
    """tiny_cnn at the output of model[split - 1]; the tail runs on a copy, as its in-place ReLU would overwrite
    the leaf."""
    return (lambda image: (model[:split](image), None)), (lambda activations, _: model[split:](activations.clone()))


def split_timm_vit(model):
    """A timm ViT at the tokens entering its last block: timm's own forward_intermediates lays the patch tokens out
    on the grid, apart from the prefix tokens."""
    def head(image):
        [(feature_map, prefix)] = model.forward_intermediates(image, indices=[len(model.blocks) - 2],
                                                             return_prefix_tokens=True, intermediates_only=True)
        return feature_map, prefix

    def tail(feature_map, prefix):
        tokens = torch.cat([prefix, feature_map.flatten(2).transpose(1, 2)], dim=1)
        return model.forward_head(model.norm(model.blocks[-1](tokens)))
    return head, tail


def split_torchvision_vit(model):
    """torchvision's ViT at the tokens entering its last encoder layer: its class token, then the patches in raster
    order."""
    encoder = model.encoder

    def head(image):
        patches = model.conv_proj(image).flatten(2).transpose(1, 2)
        tokens = torch.cat([model.class_token.expand(len(image), -1, -1), patches], dim=1)
        tokens = encoder.layers[:-1](encoder.dropout(tokens + encoder.pos_embedding))
        rows = image.shape[-2] // model.patch_size
        return tokens[:, 1:].unflatten(1, (rows, -1)).permute(0, 3, 1, 2), tokens[:, :1]

    def tail(feature_map, class_token):
        tokens = torch.cat([class_token, feature_map.flatten(2).transpose(1, 2)], dim=1)
        return model.heads(encoder.ln(encoder.layers[-1](tokens))[:, 0])
    return head, tail


def split_swin(model, stages_before):
    """timm's Swin, whose stages give [B, h, w, C], after its first stages_before stages, or after its final norm
    (stages_before=None)."""
    def head(image):
        features = model.patch_embed(image)
        if stages_before is None:
            features = model.norm(model.layers(features))
        else:
            features = model.layers[:stages_before](features)
        return features.permute(0, 3, 1, 2), None

    def tail(feature_map, _):
        features = feature_map.permute(0, 2, 3, 1)
        if stages_before is not None:
            features = model.norm(model.layers[stages_before:](features))
        return model.forward_head(features)
    return head, tail


def assert_pyramids_equal(got, want):
    assert len(got) == len(want)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


class WithSpareLayer(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.spare = nn.Conv2d(3, 3, 1)  # never called

    def forward(self, images):
        return self.model(images)


def hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("target_layer, oracle", [
    ("3", lambda model, images, labels: analytic_cam(model, images, labels)),
    ("1", lambda model, images, labels: per_image_autograd_cam(*split_sequential(model, 2), images, labels)),
    # The conv output, which the next ReLU overwrites in place: Grad-CAM of the values the conv produced.
    ("0", lambda model, images, labels: per_image_autograd_cam(*split_sequential(model, 1), images, labels)),
])
def test_matches_hand_computed_grad_cam(target_layer, oracle):
    model = tiny_cnn()
    torch.manual_seed(1)
    images = torch.rand(3, 3, 64, 96)
    labels = torch.tensor([0, 3, 4])
    got = GradCAM(model, target_layer, min_patch_size=8, max_patch_size=32)(images, labels)
    want = patch_sums(oracle(model, images, labels), 64, 96, 8, 32)
    assert [tuple(m.shape) for m in got] == [(3, 2, 3), (3, 4, 6)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        assert (g > 0).any()


def test_labels():
    model = tiny_cnn()
    images = torch.rand(2, 3, 64, 64)
    predicted = model(images).argmax(1)
    scorer = GradCAM(model, min_patch_size=8, max_patch_size=32)
    assert_pyramids_equal(scorer(images), scorer(images, predicted))
    assert_pyramids_equal(scorer(images, predicted.int()), scorer(images, predicted))
    first, other = scorer(images, torch.tensor([0, 0])), scorer(images, torch.tensor([1, 2]))
    assert not any(torch.allclose(a[b], o[b]) for a, o in zip(first, other) for b in range(2))
    # Labels given to the constructor serve the calls that pass none, as tokenize's; an int serves every image.
    fixed = GradCAM(model, min_patch_size=8, max_patch_size=32, labels=torch.tensor([1, 2]))
    assert_pyramids_equal(fixed(images), other)
    assert_pyramids_equal(fixed(images, 0), first)


def test_default_target_of_resnet_is_layer4_and_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=N_CLASSES)
    model.conv1.requires_grad_(False)
    model.train()
    model.layer1.eval()  # a frozen stage: its own flag must come back too
    flags = [m.training for m in model.modules()]
    requires_grad = [p.requires_grad for p in model.parameters()]
    running_mean = model.bn1.running_mean.clone()
    images = torch.rand(2, 3, 128, 128)  # layer4 is 4x4: resampled bilinearly to the 8x8 grid of 16 px cells

    pyramid = GradCAM(model)(images)
    assert_pyramids_equal(pyramid, GradCAM(model, "layer4")(images))
    assert_pyramids_equal(pyramid, GradCAM(model, model.layer4)(images))
    assert all((m > 0).any() for m in pyramid)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == requires_grad
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(model.bn1.running_mean, running_mean)  # scored in eval mode
    assert hooks_left(model) == 0


def test_default_target_skips_pooling_to_a_fixed_size():
    """As VGG's AdaptiveAvgPool2d((7, 7)): a 2x2 map would lose the 64x128 images' aspect ratio."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, N_CLASSES))
    images = torch.rand(2, 3, 64, 128)
    assert_pyramids_equal(GradCAM(model, min_patch_size=16, max_patch_size=32)(images),
                          GradCAM(model, "1", min_patch_size=16, max_patch_size=32)(images))


@pytest.mark.parametrize("make_model, block_before_last, height, width", [
    (vit, "blocks.0", 64, 64),
    (lambda: vit(reg_tokens=2, dynamic_img_size=True), "blocks.0", 64, 128),  # 3 prefix tokens, a 4x8 grid
    (torchvision_vit, "encoder.layers.encoder_layer_0", 64, 64),
])
def test_default_target_of_vits_is_the_input_of_the_last_block(make_model, block_before_last, height, width):
    model = make_model()
    images = torch.rand(2, 3, height, width)
    pyramid = GradCAM(model)(images)
    assert [tuple(m.shape) for m in pyramid] == [(2, height // 64, width // 64), (2, height // 32, width // 32)]
    # The tokens entering the last block are those the block before it outputs.
    assert_pyramids_equal(pyramid, GradCAM(model, block_before_last)(images))
    assert all((m > 0).any() for m in pyramid)
    assert all(p.grad is None for p in model.parameters())
    assert hooks_left(model) == 0


def test_last_block_output_carries_no_gradient_to_a_class_token_head():
    """Why the default reads the last block's input: after the last block only the class token reaches the head."""
    model = vit()
    assert all((m == 0).all() for m in GradCAM(model, "blocks.1")(torch.rand(2, 3, 64, 64)))


def test_channels_last_feature_maps_of_swin():
    model = swin()
    images = torch.rand(2, 3, 64, 64)
    pyramid = GradCAM(model)(images)
    assert_pyramids_equal(pyramid, GradCAM(model, "norm")(images))  # [B, h, w, C]: the model's output_fmt says so
    assert [tuple(m.shape) for m in pyramid] == [(2, 1, 1), (2, 2, 2)]
    assert all((m > 0).all() for m in pyramid)


@pytest.mark.parametrize("make_model, target_layer, split, height, width", [
    (lambda: vit(img_size=128), None, split_timm_vit, 128, 128),
    (lambda: vit(reg_tokens=2, dynamic_img_size=True), None, split_timm_vit, 64, 128),
    (lambda: torchvision_vit(image_size=128), None, split_torchvision_vit, 128, 128),
    # After the final norm only the pooling and the linear head follow, so dlogit/dA is the same at every place:
    # the activations' layout is checked; after the first stage, whose output the second downsamples, both are.
    (lambda: swin(img_size=128), None, lambda model: split_swin(model, None), 128, 128),
    (lambda: swin(img_size=128), "layers.0", lambda model: split_swin(model, 1), 128, 128),
], ids=["timm_vit", "timm_vit_registers", "torchvision_vit", "swin_norm", "swin_first_stage"])
def test_vits_and_swin_match_per_image_autograd_grad_cam(make_model, target_layer, split, height, width):
    """The oracle runs a float64 copy of the model one image at a time, split by hand at the target layer."""
    model = make_model()
    torch.manual_seed(1)
    images = torch.rand(3, 3, height, width)
    labels = torch.tensor([1, 3, 2])
    got = GradCAM(model, target_layer)(images, labels)
    oracle_model = copy.deepcopy(model).double().eval()  # eval: Swin's drop path is on in training
    want = patch_sums(per_image_autograd_cam(*split(oracle_model), images.double(), labels),
                      height, width, 16, 64)
    assert [tuple(m.shape) for m in got] == [(3, height // 64, width // 64), (3, height // 32, width // 32)]
    for g, w in zip(got, want, strict=True):
        # Measured: within 1.1e-6 of the largest score (float32 against float64), on 1 and 2 threads.
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
        assert (g.flatten(1) > 0).any(1).all()  # no image's map is all zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtype_device_determinism(dtype):
    model = tiny_cnn().to(dtype)
    images = torch.rand(2, 3, 64, 128, dtype=dtype)
    scorer = GradCAM(model, min_patch_size=8, max_patch_size=64)
    pyramid = scorer(images)
    assert [tuple(m.shape) for m in pyramid] == [(2, 1, 2), (2, 2, 4), (2, 4, 8)]
    assert all(m.dtype == dtype and m.device == images.device for m in pyramid)
    assert all(torch.isfinite(m).all() and (m >= 0).all() for m in pyramid)
    assert_pyramids_equal(pyramid, scorer(images.clone()))
    assert GradCAM(tiny_cnn(), min_patch_size=32, max_patch_size=32)(images.float()) == []


def test_works_under_no_grad_and_leaves_images_alone():
    model = tiny_cnn()
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    scorer = GradCAM(model, min_patch_size=8, max_patch_size=32)
    with torch.no_grad():
        pyramid = scorer(images)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert not any(m.requires_grad for m in pyramid)
    assert images.grad is None
    assert_pyramids_equal(pyramid, scorer(images.detach()))


def test_tokenize_splits_where_the_class_evidence_is():
    model = tiny_cnn()
    with torch.no_grad():  # positive weights, no biases: features, and the map, only where the image has texture
        for layer in (model[0], model[2], model[6]):
            layer.weight.abs_()
            layer.bias.zero_()
    torch.manual_seed(2)
    images = torch.zeros(2, 3, 64, 64)
    images[0, :, :32, :32] = torch.rand(3, 32, 32)
    images[1, :, 32:, 32:] = torch.rand(3, 32, 32)
    scorer = GradCAM(model, min_patch_size=8, max_patch_size=32, labels=0)
    mosaic = mixres.tokenize(images, scorer, n_patches=19)  # 4 roots; the textured one to 8 px: 3 + 12 splits
    assert mosaic.tokens.shape == (2, 19, 3, 8, 8)
    for boxes, corner in zip(mosaic.boxes, (0, 32)):
        y, x, size = boxes.T
        textured = (y // 32 == corner // 32) & (x // 32 == corner // 32)
        assert textured.sum() == 16 and (size[textured] == 8).all() and (size[~textured] == 32).all()


def test_hooks_and_flags_are_restored_when_the_forward_fails():
    model = tiny_cnn().train()
    wrong_channels = torch.rand(1, 4, 64, 64)
    for target_layer in (None, "3"):
        with pytest.raises(ValueError, match="images have 4 channels, but model Sequential takes 3"):
            GradCAM(model, target_layer, min_patch_size=8, max_patch_size=32)(wrong_channels)
        assert hooks_left(model) == 0
        assert all(m.training for m in model.modules())


def test_rejects_bad_arguments():
    model = tiny_cnn()
    images = torch.rand(2, 3, 64, 64)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        GradCAM("resnet18")
    with pytest.raises(ValueError, match="'layer4' is not a submodule of Sequential"):
        GradCAM(model, "layer4")
    with pytest.raises(ValueError, match="Conv2d is not a submodule"):
        GradCAM(model, nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match="target_layer must be"):
        GradCAM(model, 3)
    with pytest.raises(TypeError, match="labels must be an int"):
        GradCAM(model, labels=torch.tensor([0.0, 1.0]))
    scorer = GradCAM(model, min_patch_size=8, max_patch_size=32)
    with pytest.raises(ValueError, match=r"labels must have shape \[B\] = \[2\]"):
        scorer(images, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        scorer(images, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        scorer(images, -1)
    with pytest.raises(ValueError, match="multiple of max_patch_size"):
        scorer(torch.rand(1, 3, 48, 64))
    with pytest.raises(ValueError, match="model is on cpu but images are on meta: move the model"):
        scorer(torch.rand(2, 3, 64, 64, device="meta"))
    with pytest.raises(ValueError, match="found no target layer in Sequential.*pass target_layer"):
        GradCAM(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, N_CLASSES)))(images)
    with pytest.raises(ValueError, match="'spare' is not called by the model's forward"):
        GradCAM(WithSpareLayer(model), "spare", min_patch_size=8, max_patch_size=32)(images)
    with pytest.raises(ValueError, match="model must return logits"):
        GradCAM(model[:4], "1", min_patch_size=8, max_patch_size=32)(images)
    assert hooks_left(model) == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_without_host_sync():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=N_CLASSES)
    images = torch.rand(4, 3, 128, 192)
    labels = torch.tensor([0, 1, 2, 3])
    want = GradCAM(model)(images, labels)
    model.cuda()
    scorer = GradCAM(model)
    images, cuda_labels = images.cuda(), labels.cuda()
    got = scorer(images, labels)  # also the warm-up: the probe for the default layer, lazy CUDA set-up
    for g, w in zip(got, want):
        assert g.device.type == "cuda"
        # cuDNN convolutions round their inputs to TF32 by default.
        torch.testing.assert_close(g.cpu(), w, rtol=1e-2, atol=1e-2 * w.abs().max().item())
    torch.cuda.synchronize()
    with raising_on_host_sync():
        scorer(images, cuda_labels)
        scorer(images, labels)
        scorer(images)
