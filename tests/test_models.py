"""mixres.models: the Quadformer on timm ViTs. The key invariant (a mosaic of min_patch_size leaves with the
resampled table reproduces the plain ViT), position embeddings against direct computations, gradients, budgets,
torch.compile, checkpoints through timm, and the errors."""
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import mixres
from mixres.models import LearnedXYEmbed, Quadformer, UniformGrid, leaf_table_embed, sincos_xy_embed
from mixres.scorers import PixelBlur, Random, Scorer, Uniform

import old_checkpoints
from helpers import random_mosaic

# Small ViTs covering timm's variants: class token with it in the table, DeiT-III's table without the prefix
# tokens (no_embed_class), register tokens, no class token with average or max pooling (benchmarks/small_objects.sh),
# non-square images.
VIT_VARIANTS = {
    "cls": dict(),
    "no_embed_class": dict(no_embed_class=True),
    "registers": dict(reg_tokens=2, no_embed_class=True),
    "avg_pool": dict(class_token=False, global_pool="avg"),
    "max_pool": dict(class_token=False, global_pool="max"),
    "non_square": dict(img_size=(64, 128)),
}


def small_vit(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    vit = VisionTransformer(**{**config, **overrides}).eval()
    with torch.no_grad():  # timm zero-initialises some of these; random values make the comparisons meaningful
        for token in (vit.pos_embed, vit.cls_token, vit.reg_token):
            if token is not None:
                token.normal_(std=0.5)
    return vit


def full_grid(vit):
    height, width = vit.patch_embed.img_size
    return (height // 16) * (width // 16)


# ------------------------------------------------------------------------------------------------ key invariant
@pytest.mark.parametrize("variant", VIT_VARIANTS)
@pytest.mark.parametrize("scorer", ["uniform", "random", "pixel-blur"])
def test_a_mosaic_of_the_finest_leaves_reproduces_the_vit(variant, scorer):
    vit = small_vit(**VIT_VARIANTS[variant])
    model = Quadformer(vit, n_patches=full_grid(vit), scorer=scorer, pos_embed="resample").eval()
    images = torch.randn(3, 3, *vit.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(images), vit(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_features(images), vit.forward_features(images), rtol=1e-5,
                                   atol=1e-5)


def test_the_registered_vit_b16_reproduces_timm():
    model = timm.create_model("quadformer_vit_base_patch16_224", n_patches=196, depth=2).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.vit(images), rtol=1e-5, atol=1e-5)
    assert isinstance(model.vit, VisionTransformer) and model.vit.embed_dim == 768


def test_the_budget_can_change_per_call_and_between_calls():
    vit = small_vit(img_size=128)
    model = Quadformer(vit, n_patches=64, scorer=PixelBlur(16, 64)).eval()
    images = torch.randn(2, 3, 128, 128)
    assert model.forward_features(images).shape == (2, 1 + 64, 32)
    assert model.forward_features(images, n_patches=13).shape == (2, 1 + 13, 32)
    model.n_patches = 28
    assert model.forward_features(images).shape == (2, 1 + 28, 32)
    assert model(images).shape == (2, 5)


def test_images_and_their_prepared_mosaic_give_the_same_logits():
    model = Quadformer(small_vit(img_size=128), n_patches=31, scorer=PixelBlur(16, 64)).eval()
    images = torch.randn(2, 3, 128, 128)
    mosaic = model.tokenize(images)
    assert mosaic.tokens.shape == (2, 31, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(mosaic), model(images))
    with pytest.raises(ValueError, match="n_patches=13 was given with a mosaic of 31 leaves"):
        model(mosaic, n_patches=13)


def test_the_scorer_sees_unnormalised_images():
    class Recording(Uniform):
        def __call__(self, images):
            self.seen = images.clone()
            return super().__call__(images)

    scorer = Recording(16, 64)
    vit = small_vit()
    model = Quadformer(vit, n_patches=16, scorer=scorer, input_mean=(0.5, 0.4, 0.3), input_std=(0.2, 0.25, 0.5))
    images = torch.randn(1, 3, 64, 64)
    model(images)
    expected = images * torch.tensor([0.2, 0.25, 0.5]).view(3, 1, 1) + torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)
    torch.testing.assert_close(scorer.seen, expected)
    # By default, the ViT's own pretrained_cfg normalisation.
    created = timm.create_model("quadformer_vit_tiny_patch16_224", depth=1)
    torch.testing.assert_close(created.input_mean.flatten(), torch.tensor(created.vit.pretrained_cfg["mean"]))


# ---------------------------------------------------------------------------------------- position embeddings
def test_leaf_table_embed_is_the_mean_over_each_leafs_cells():
    images, mosaic = random_mosaic(batch=2, height=128, width=192, n_patches=60)
    table = torch.randn(8, 12, 6, dtype=torch.float64)
    embedded = leaf_table_embed(table, mosaic.boxes, 16, 64)
    for b in range(2):
        for n, (y, x, size) in enumerate(mosaic.boxes[b].tolist()):
            cells = table[y // 16:(y + size) // 16, x // 16:(x + size) // 16]
            torch.testing.assert_close(embedded[b, n], cells.mean(dim=(0, 1)))
    assert (mosaic.boxes[..., 2] > 16).any() and (mosaic.boxes[..., 2] == 16).any()


def test_sincos_xy_embed_formula():
    centers = torch.tensor([[[0.0, 0.0], [1.5, 4.0], [1.5, 2.5]]])
    embedded = sincos_xy_embed(centers, dim=16)
    assert embedded.shape == (1, 3, 16) and embedded.dtype == torch.float32
    frequencies = 10000.0 ** (-torch.arange(4) / 4)
    y, x = 1.5, 4.0
    expected = torch.cat([torch.sin(y * frequencies), torch.cos(y * frequencies),
                          torch.sin(x * frequencies), torch.cos(x * frequencies)])
    torch.testing.assert_close(embedded[0, 1], expected)
    torch.testing.assert_close(embedded[0, 1, :8], embedded[0, 2, :8])  # same y, same first half
    assert not torch.allclose(embedded[0, 1, 8:], embedded[0, 2, 8:])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_xy_embed(centers, dim=18)


def test_learned_xy_embed_reads_the_half_cell_lattice_and_interpolates():
    embed = LearnedXYEmbed(grid=(4, 8), dim=6)
    assert embed.y_table.shape == (7, 3) and embed.x_table.shape == (15, 3)
    centers = torch.tensor([[[1.5, 3.0], [0.0, 7.0]]])  # (y, x) in cells
    out = embed(centers, grid=(4, 8))
    torch.testing.assert_close(out[0, 0], torch.cat([embed.y_table[3], embed.x_table[6]]))
    torch.testing.assert_close(out[0, 1], torch.cat([embed.y_table[0], embed.x_table[14]]))
    # An image twice the size: centre 3.0 of 8 cells maps to 3.0 * 6/7 half cells on the y table.
    position = 3.0 * 6 / 7
    weight = position - 2
    expected_y = embed.y_table[2] * (1 - weight) + embed.y_table[3] * weight
    torch.testing.assert_close(embed(torch.tensor([[[3.0, 0.0]]]), grid=(8, 16))[0, 0, :3], expected_y)


@pytest.mark.parametrize("pos_embed", ["resample", "xy", "xy-learned"])
def test_each_pos_embed_kind_is_a_module_of_one_interface(pos_embed):
    model = Quadformer(small_vit(img_size=128), n_patches=31, scorer=PixelBlur(16, 64), pos_embed=pos_embed).eval()
    kind = model.pos_embed
    assert isinstance(kind, nn.Module) and kind.kind == model.pos_embed_kind == pos_embed
    assert kind.reads_centers == (pos_embed != "resample")
    mosaic = model.tokenize(torch.randn(2, 3, 128, 128))
    positions = kind(mosaic, model.vit)
    assert positions.shape == (2, 31, 32) and positions.dtype == torch.float32
    # Leaf n's centre in 16 px cells: (corner + size / 2) / 16 - 0.5, as docs/design.md defines it.
    y, x, size = mosaic.boxes[1, 5].tolist()
    centre = ((y + size / 2) / 16 - 0.5, (x + size / 2) / 16 - 0.5)
    if pos_embed == "resample":
        # The mean of the table's entries (after the class token's) over the 16 px cells the leaf covers.
        table = model.vit.pos_embed[0, 1:].reshape(8, 8, 32)
        expected = table[y // 16:(y + size) // 16, x // 16:(x + size) // 16].mean(dim=(0, 1))
    elif pos_embed == "xy":
        frequencies = 10000.0 ** (-torch.arange(8) / 8)
        expected = torch.cat([torch.cat([(c * frequencies).sin(), (c * frequencies).cos()]) for c in centre])
    else:
        # The tables hold one entry per half cell of the 8 x 8 grid; centres fall on them (2 c).
        tables = model.xy_embed.y_table, model.xy_embed.x_table
        expected = torch.cat([table[round(2 * c)] for table, c in zip(tables, centre)])
    torch.testing.assert_close(positions[1, 5], expected)
    # The kind's parameters, and only those, stay out of weight decay, under the names the optimizer sees.
    own = {name for name, _ in kind.named_parameters()}
    assert kind.no_weight_decay() == own == ({"xy_embed.y_table", "xy_embed.x_table"} if pos_embed == "xy-learned"
                                             else set())
    named = {f"pos_embed.{name}" for name in own}
    assert named <= model.no_weight_decay() and named <= set(dict(model.named_parameters()))
    assert (model.xy_embed is None) == (pos_embed != "xy-learned")


def test_checkpoints_keep_their_layout_whatever_the_module_that_holds_the_learned_tables():
    model = Quadformer(small_vit(), n_patches=16, pos_embed="xy-learned")
    keys = list(model.state_dict())
    # The learned tables keep the names they always had, after the ViT's (and the scorer's) weights; the
    # parameters are named after the module that holds them.
    assert keys[-2:] == ["xy_embed.y_table", "xy_embed.x_table"] and not any("pos_embed.xy" in key for key in keys)
    assert {"pos_embed.xy_embed.y_table", "pos_embed.xy_embed.x_table"} <= set(dict(model.named_parameters()))
    assert list(UniformGrid(model).state_dict()) == [f"quadformer.{key}" for key in keys]
    # A state dict named as the parameters are loads as well.
    source = Quadformer(small_vit(seed=3), n_patches=16, pos_embed="xy-learned")
    model.load_state_dict(dict(source.named_parameters()))
    assert torch.equal(model.xy_embed.x_table, source.xy_embed.x_table)


@pytest.mark.parametrize("saved", ["resample", "xy", "xy-learned", "uniform grid"])
def test_checkpoints_of_e83975a_load_as_they_were_saved_and_give_the_logits_they_gave(saved):
    fixture = torch.load(Path(__file__).parent / "data" / old_checkpoints.PATH, weights_only=True)
    kind = "xy-learned" if saved == "uniform grid" else saved
    state = fixture["state"][kind]
    model = Quadformer(old_checkpoints.tiny_vit(seed=9), n_patches=old_checkpoints.N_PATCHES, scorer="pixel-blur",
                       pos_embed=kind).eval()
    images = old_checkpoints.pixels(fixture["images"])
    if saved == "uniform grid":
        # A UniformGrid's state dict is its Quadformer's under quadformer.
        grid = UniformGrid(model).eval()
        grid.load_state_dict({f"quadformer.{key}": value for key, value in state.items()})
        with torch.no_grad():
            logits = grid(images, grid=old_checkpoints.UNIFORM_GRID)
    else:
        model.load_state_dict(state)
        with torch.no_grad():
            logits = model(images)
    saved_again = model.state_dict()
    assert list(saved_again) == list(state)
    assert all(torch.equal(saved_again[key], value) for key, value in state.items())
    # The recorded logits came from another machine, maybe: float32 rounding may differ, nothing else.
    torch.testing.assert_close(logits, fixture["logits"][saved])


@pytest.mark.parametrize("pos_embed", ["resample", "xy", "xy-learned"])
@pytest.mark.parametrize("variant", ["cls", "no_embed_class", "avg_pool"])
def test_gradients_reach_every_trainable_parameter(pos_embed, variant):
    model = Quadformer(small_vit(img_size=128, **VIT_VARIANTS[variant]), n_patches=31, scorer=PixelBlur(16, 64),
                       pos_embed=pos_embed).train()
    images = torch.randn(2, 3, 128, 128, requires_grad=True)
    model(images).square().sum().backward()
    parameters = dict(model.named_parameters())
    assert parameters, "no parameters"
    for name, parameter in parameters.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert images.grad.abs().sum() > 0  # through the resize op's backward
    if pos_embed != "resample":
        # The ViT's table of patch positions is gone; the prefix tokens' entries stay.
        table = model.vit.pos_embed
        assert table is None if variant != "cls" else table.shape == (1, 1, 32)


# ------------------------------------------------------------------------------------------------ torch.compile
def test_the_whole_model_compiles_with_fullgraph_and_matches_eager():
    model = Quadformer(small_vit(img_size=128), n_patches=31, scorer=PixelBlur(16, 64)).eval()
    images = torch.randn(2, 3, 128, 128)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- timm and checkpoints
def test_timm_registry_and_model_defaults():
    names = timm.list_models("quadformer_*")
    assert {"quadformer_vit_small_patch16_224", "quadformer_vit_base_patch16_224",
            "quadformer_vit_large_patch16_224", "quadformer_vit_base_patch16_384"} <= set(names)
    model = timm.create_model("quadformer_vit_small_patch16_224", scorer="entropy", num_classes=10, depth=1)
    assert (model.n_patches, model.min_patch_size, model.max_patch_size) == (100, 16, 32)
    assert type(model.scorer) is mixres.Entropy and model.num_classes == 10
    model = timm.create_model("quadformer_vit_small_patch16_384", depth=1, n_patches=102, pos_embed="xy")
    assert (model.n_patches, model.max_patch_size, model.pos_embed_kind) == (102, 64, "xy")
    assert timm.create_model("quadformer_vit_small_patch16_384", depth=1).n_patches == 288
    assert "vit.pos_embed" in model.no_weight_decay()


def test_the_default_budget_is_about_half_the_grid_at_any_image_size_and_for_any_vit():
    # 16 cells of 16 px at 64 px, 16-64 px leaves: 1, 4, 7, 10... leaves; 10 is the fewest of at least 8.
    assert timm.create_model("quadformer_vit_tiny_patch16_224", depth=1, img_size=64).n_patches == 10
    model = mixres.models.create_model("quadformer_deit3_small_patch16_224", depth=1, num_classes=3)
    assert (model.n_patches, model.num_classes, type(model.vit).__name__) == (100, 3, "VisionTransformer")


def test_pretrained_weights_through_timm_from_a_local_file(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", depth=2)
    path = tmp_path / "vit_tiny.pth"
    torch.save(vit.state_dict(), path)
    model = timm.create_model("quadformer_vit_tiny_patch16_224", pretrained=True, depth=2,
                              pretrained_cfg_overlay=dict(file=str(path)))
    for name, value in vit.state_dict().items():
        assert torch.equal(model.vit.state_dict()[name], value), name
    # A new head for another number of classes, the rest pretrained: timm's own adaptation.
    model = timm.create_model("quadformer_vit_tiny_patch16_224", pretrained=True, depth=2, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert model.num_classes == 3 and torch.equal(model.vit.cls_token, vit.cls_token)


@pytest.mark.parametrize("pos_embed", ["resample", "xy"])
def test_checkpoint_path_takes_a_plain_vit_or_a_quadformer_checkpoint(tmp_path, pos_embed):
    vit = small_vit(seed=1, img_size=224)
    plain = tmp_path / "plain.pth"
    torch.save(vit.state_dict(), plain)
    kwargs = dict(embed_dim=32, depth=2, num_heads=2, num_classes=5, pos_embed=pos_embed)
    model = timm.create_model("quadformer_vit_tiny_patch16_224", checkpoint_path=str(plain), **kwargs)
    assert torch.equal(model.vit.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    assert torch.equal(model.vit.pos_embed, vit.pos_embed if pos_embed == "resample" else vit.pos_embed[:, :1])

    saved = tmp_path / "quadformer.pth"
    torch.save(model.state_dict(), saved)
    again = timm.create_model("quadformer_vit_tiny_patch16_224", checkpoint_path=str(saved), **kwargs)
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


@pytest.mark.parametrize("img_size, n_patches", [(128, 64), ((64, 128), 32)])  # 4x4 to 8x8, and to 4x8
def test_a_plain_checkpoint_of_another_grid_is_resampled_on_load(img_size, n_patches):
    source = small_vit(img_size=64)
    model = Quadformer(small_vit(seed=2, img_size=img_size), n_patches=n_patches, scorer="uniform")
    model.load_state_dict(source.state_dict())
    rows, cols = model.vit.patch_embed.grid_size
    # timm's own pretrained loading resamples bicubically with antialias=True, whose kernel (a = -0.5, PIL's)
    # differs from plain bicubic's (a = -0.75) even when upsampling: plain bicubic would be 0.09 away here.
    grid = source.pos_embed[:, 1:].detach().unflatten(1, (4, 4)).permute(0, 3, 1, 2)
    resampled = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False, antialias=True)
    want = torch.cat([source.pos_embed[:, :1].detach(), resampled.flatten(2).transpose(1, 2)], dim=1)
    assert model.vit.pos_embed.shape == (1, 1 + rows * cols, 32)
    torch.testing.assert_close(model.vit.pos_embed.detach(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(model.vit.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


# ------------------------------------------------------------------------------------------------------- errors
def test_bad_arguments_name_the_problem():
    vit = small_vit()
    with pytest.raises(ValueError, match="pos_embed must be one of resample, xy, xy-learned"):
        Quadformer(vit, n_patches=16, pos_embed="rope")
    with pytest.raises(ValueError, match="n_patches=17 is unreachable.*nearest valid: 16 or 19"):
        Quadformer(small_vit(img_size=128), n_patches=17)
    with pytest.raises(ValueError, match="not a multiple of max_patch_size 64"):
        Quadformer(small_vit(img_size=96), n_patches=36, max_patch_size=64)
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        Quadformer(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="non-overlapping"):
        overlapping = small_vit()
        overlapping.patch_embed.proj = nn.Conv2d(3, 32, 16, stride=8)
        Quadformer(overlapping, n_patches=16)
    with pytest.raises(ValueError, match="16-32 px, but 16-64 px"):
        Quadformer(small_vit(), n_patches=16, scorer=PixelBlur(16, 32))
    with pytest.raises(ValueError, match="unknown"):
        Quadformer(small_vit(), n_patches=16, scorer="saliency")
    with pytest.raises(ValueError, match="has none"):
        Quadformer(small_vit(pos_embed="none"), n_patches=16, pos_embed="resample")
    with pytest.raises(ValueError, match="input_mean and input_std need 3 values"):
        Quadformer(small_vit(), n_patches=16, input_mean=(0.5,), input_std=(0.5,))

    model = Quadformer(small_vit(img_size=128), n_patches=64, scorer=Random(16, 64, seed=0))
    _, other = random_mosaic(batch=1, height=128, width=128, n_patches=31, patch_size=8)
    with pytest.raises(ValueError, match=r"mosaic tokens must be \[B, N, 3, 16, 16\]"):
        model(other)
    with pytest.raises(ValueError, match="unreachable"):
        model(torch.randn(1, 3, 128, 128), n_patches=65)
    with pytest.raises(ValueError, match="scores for patch sizes 16-32 px"):
        model.scorer = PixelBlur(16, 32)
    assert isinstance(model.scorer, Scorer)
