"""The Quadformer on padded mosaics (issue 15): image b's logits in a padded batch are those it gets alone at its own
length, for every pooling and position embedding; padding (whatever it holds) changes nothing and gets no gradient;
grad checkpointing, torch.compile and CUDA without host synchronisation; the errors.

The padded batches are built by hand (helpers.pad_mosaics) from single-image mosaics of their own budgets, and the
references are the same mosaics run one by one, unpadded."""
import dataclasses

import pytest
import timm
import torch

import mixres
from mixres.models import POS_EMBEDS, Quadformer
from mixres.models import quadformer as quadformer_module

from helpers import float64_tolerance, pad_mosaics, raising_on_host_sync

IMAGE_SIZE = 128
# Three budgets of the 128 px geometry with 16-64 px leaves (mixres.valid_n_patches): one image at N_max, two shorter.
LENGTHS = (16, 31, 7)
assert set(LENGTHS) <= set(mixres.valid_n_patches(IMAGE_SIZE, min_patch_size=16, max_patch_size=64))

# timm's poolings, with the prefix tokens each one has: class token ('token'); average, max and their mix over the
# leaves, with and without a class token; the registers and class token pooled with the leaves
# (pool_include_prefix); attention pooling ('map'); and none (every token's logits).
POOLINGS = {
    "token": dict(),
    "avg": dict(class_token=False, global_pool="avg"),
    "max": dict(class_token=False, global_pool="max"),
    "avgmax": dict(global_pool="avgmax"),
    "avg_with_prefix": dict(reg_tokens=2, global_pool="avg", pool_include_prefix=True),
    "map": dict(class_token=False, global_pool="map"),
    "none": dict(global_pool=""),
}


def tiny_quadformer(pos_embed="resample", seed=0, dtype=torch.float64, **vit_kwargs):
    """A registered Quadformer with a tiny random ViT (2 blocks, D = 32) at 128 px, 16-64 px leaves."""
    torch.manual_seed(seed)
    model = timm.create_model("quadformer_vit_tiny_patch16_224", img_size=IMAGE_SIZE, embed_dim=32, depth=2,
                              num_heads=2, num_classes=5, n_patches=31, pos_embed=pos_embed, **vit_kwargs)
    vit = model.vit
    with torch.no_grad():  # timm initialises these (nearly) to zero; random values make the comparisons meaningful
        for token in (vit.pos_embed, vit.cls_token, vit.reg_token):
            if token is not None:
                token.normal_(std=0.5)
    return model.eval().to(dtype)


def single_mosaics(model, seed=0, lengths=LENGTHS):
    """One mosaic per image, each of its own budget, chosen by the model's scorer (pixel-blur) on random images."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(len(lengths), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator, dtype=torch.float64)
    dtype = next(model.parameters()).dtype
    return [model.tokenize(images[b:b + 1].to(dtype), n_patches=n) for b, n in enumerate(lengths)]


def valid_leaves(mosaic):
    """[B, N] bool from the layout's definition: the first lengths[b] leaves of image b."""
    return torch.arange(mosaic.tokens.shape[1], device=mosaic.tokens.device) < mosaic.lengths[:, None]


def use_fused_attention(model, fused):
    """timm's attention through F.scaled_dot_product_attention (fused) or its explicit softmax (not)."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("pos_embed", POS_EMBEDS)
def test_each_image_of_a_padded_batch_gets_its_logits_alone(pos_embed, pooling):
    model = tiny_quadformer(pos_embed, **POOLINGS[pooling])
    singles = single_mosaics(model)
    padded = pad_mosaics(singles)
    n_prefix = model.vit.num_prefix_tokens
    for fused in (True, False):
        use_fused_attention(model, fused)
        with torch.no_grad():
            batch = model(padded)
            alone = [model(mosaic)[0] for mosaic in singles]
            # The same in two steps, to the pooled features.
            pooled = model.forward_head(model.forward_features(padded), pre_logits=True, valid=padded.valid)
            pooled_alone = [model.forward_head(model.forward_features(mosaic), pre_logits=True)[0]
                            for mosaic in singles]
        for outputs, references in ((batch, alone), (pooled, pooled_alone)):
            for b, want in enumerate(references):
                # Without pooling, each token has its output: the prefix and the valid leaves are compared.
                got = outputs[b, :n_prefix + LENGTHS[b]] if pooling == "none" else outputs[b]
                torch.testing.assert_close(got, want, rtol=0, atol=float64_tolerance(want),
                                           msg=lambda text: f"image {b}, fused attention {fused}: {text}")

    # The control: the same batch with its padding read as leaves (the first cell's, where the boxes must be
    # leaves) changes the shorter images' logits by far more than the tolerance, which therefore sees a leak.
    stand_in = torch.tensor([0, 0, 16], dtype=padded.boxes.dtype)
    leaky = dataclasses.replace(padded, lengths=None, boxes=torch.where(valid_leaves(padded)[..., None],
                                                                        padded.boxes, stand_in))
    with torch.no_grad():
        leaked = model(leaky)
    for b, want in enumerate(alone):
        if LENGTHS[b] < max(LENGTHS):
            got = leaked[b, :n_prefix + LENGTHS[b]] if pooling == "none" else leaked[b]
            assert (got - want).abs().max() > 1000 * float64_tolerance(want), b


@pytest.mark.parametrize("pos_embed", POS_EMBEDS)
def test_what_the_padding_holds_changes_nothing(pos_embed):
    model = tiny_quadformer(pos_embed, **POOLINGS["avgmax"])
    padded = pad_mosaics(single_mosaics(model))
    padding = ~valid_leaves(padded)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(padded.tokens.shape, generator=generator, dtype=torch.float64) * 1e3
    tokens.view(-1)[::7] = float("nan")
    tokens.view(-1)[1::7] = float("inf")
    # Boxes that are no leaves: off the grid, misaligned, larger than the image, of size 0.
    boxes = torch.randint(-64, 256, padded.boxes.shape, generator=generator, dtype=torch.int32)
    centers = torch.randn(padded.centers.shape, generator=generator) * 100
    garbage = dataclasses.replace(
        padded, tokens=torch.where(padding[..., None, None, None], tokens, padded.tokens),
        boxes=torch.where(padding[..., None], boxes, padded.boxes),
        centers=torch.where(padding[..., None], centers, padded.centers))
    with torch.no_grad():
        assert torch.equal(model(garbage), model(padded))
        features = model.forward_features(garbage)
    assert torch.isfinite(features).all()  # padding rows too: finite, meaningless


@pytest.mark.parametrize("pooling", ["token", "avgmax", "map"])
def test_the_padded_forward_runs_under_bfloat16_autocast(pooling):
    """The masks meet bfloat16 attention (autocast casts the fused attention's inputs, mask included; the explicit
    path adds a float32 mask to bfloat16 logits)."""
    model = tiny_quadformer("xy", dtype=torch.float32, **POOLINGS[pooling])
    singles = single_mosaics(model)
    padded = pad_mosaics(singles)
    for fused in (True, False):
        use_fused_attention(model, fused)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            batch = model(padded)
            alone = [model(mosaic)[0] for mosaic in singles]
        for b, want in enumerate(alone):
            # Both runs round the same activations to bfloat16 (2^-8 relative), but a float32 sum in another order
            # may fall on the other side of a rounding boundary, a few times on the way: 4 units of the largest logit.
            torch.testing.assert_close(batch[b], want, rtol=0, atol=4 * 2**-8 * want.abs().max().item())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_on_a_padded_batch_gives_each_image_its_own_gradients(checkpointing):
    model = tiny_quadformer("xy-learned", **POOLINGS["avgmax"]).train()
    model.set_grad_checkpointing(checkpointing)
    block_runs = []
    # A pre-hook: checkpointing's recomputation stops as soon as it has what the backward pass needs, before the
    # block's forward hooks would run.
    model.vit.blocks[0].register_forward_pre_hook(lambda *args: block_runs.append(1))
    singles = single_mosaics(model)
    padded = pad_mosaics(singles)
    padded.tokens.requires_grad_()
    weights = torch.randn(len(LENGTHS), 5, dtype=torch.float64)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]

    (model(padded) * weights).sum().backward()
    # Checkpointing recomputes each block in the backward pass.
    assert len(block_runs) == (2 if checkpointing else 1)
    batch_grads = [parameter.grad.clone() for parameter in parameters]
    padding = ~valid_leaves(padded)
    assert torch.equal(padded.tokens.grad[padding], torch.zeros_like(padded.tokens.grad[padding]))

    model.zero_grad()
    for b, mosaic in enumerate(singles):
        tokens = mosaic.tokens.clone().requires_grad_()
        (model(dataclasses.replace(mosaic, tokens=tokens))[0] * weights[b]).sum().backward()
        want = tokens.grad[0]
        torch.testing.assert_close(padded.tokens.grad[b, :LENGTHS[b]], want, rtol=0, atol=float64_tolerance(want))
    for parameter, got in zip(parameters, batch_grads):
        # The batch's gradient is the sum of its images' (one more sum in another order than accumulation).
        torch.testing.assert_close(got, parameter.grad, rtol=0, atol=float64_tolerance(parameter.grad))
        assert parameter.grad.abs().sum() > 0


def test_the_padded_forward_compiles_with_fullgraph_and_matches_eager():
    model = tiny_quadformer("resample", dtype=torch.float32, **POOLINGS["avg_with_prefix"])
    padded = pad_mosaics(single_mosaics(model))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        # aot_eager runs the eager kernels: the same numbers.
        torch.testing.assert_close(compiled(padded), model(padded), rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pooling", ["token", "avgmax", "map"])
def test_the_padded_forward_on_cuda_does_not_synchronize_and_matches_float64(pooling):
    model = tiny_quadformer("resample", **POOLINGS[pooling])
    singles = single_mosaics(model)
    with torch.no_grad():
        truth = [model(mosaic)[0] for mosaic in singles]
    model = model.float().cuda()
    padded = pad_mosaics([dataclasses.replace(mosaic, tokens=mosaic.tokens.float().cuda(),
                                              boxes=mosaic.boxes.cuda(), centers=mosaic.centers.cuda())
                          for mosaic in singles])
    with torch.no_grad():
        model(padded)  # warm-up: lazy initialisation may synchronize once
        torch.cuda.synchronize()
        with raising_on_host_sync():
            logits = model(padded)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(model(padded)).all()  # the float mask meets bfloat16 attention
    # float32 on the GPU against float64 on the CPU: each logit is a few dozen float32 sums rounded to 2^-24
    # relative; 64 units of the largest logit hold any order of those sums (tests/test_compile.py's argument).
    for b, want in enumerate(truth):
        torch.testing.assert_close(logits[b].cpu().double(), want, rtol=0,
                                   atol=64 * 2**-24 * want.abs().max().item())


# ------------------------------------------------------------------------------------------------------- errors
def test_what_cannot_read_a_padded_mosaic_says_so():
    model = tiny_quadformer(global_pool="prr")
    padded = pad_mosaics(single_mosaics(model))
    with pytest.raises(ValueError, match="AttentionPoolPrr .*global_pool='prr'.* takes no mask"):
        model(padded)

    model = tiny_quadformer(patch_drop_rate=0.5).train()
    with pytest.raises(ValueError, match="patch dropout .* padded mosaic while training"):
        model(padded)
    model.eval()(padded)  # patch dropout does nothing in evaluation

    from timm.models.deit import VisionTransformerDistilled

    distilled = Quadformer(VisionTransformerDistilled(img_size=IMAGE_SIZE, embed_dim=32, depth=1, num_heads=2,
                                                      num_classes=5), n_patches=31).double()
    with pytest.raises(ValueError, match="VisionTransformer's own forward_head, which VisionTransformerDistilled"):
        distilled(padded)

    for lengths, error, match in [(padded.lengths.float(), TypeError, "mosaic.lengths must be int32 or int64"),
                                  (padded.lengths[:2], ValueError, "mosaic.lengths has batch size 2 but mosaic"),
                                  (padded.lengths[:, None], ValueError, r"mosaic.lengths must have rank 1 \[B\]")]:
        with pytest.raises(error, match=match):
            model(dataclasses.replace(padded, lengths=lengths))


def test_a_threshold_makes_the_model_run_on_padded_mosaics(monkeypatch):
    """``Quadformer(threshold=t)``: tokenize stops each image where t says (a padded mosaic, lengths that differ),
    and the logits are each image's own at its length; ``threshold=None`` is the fixed budget again."""
    model = tiny_quadformer(global_pool="avg", class_token=False)
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator, dtype=torch.float64)
    images[:2, :, :, 64:] = 0.5  # flat halves: fewer leaves above the threshold
    scores = model.score(images)
    threshold = float(torch.quantile(torch.cat([level.flatten() for level in scores]), 0.6))
    model.threshold = threshold
    mosaic = model.tokenize(images)
    assert mosaic.is_padded and len(set(mosaic.lengths.tolist())) > 1, mosaic.lengths
    assert torch.equal(mosaic.boxes, mixres.tokenize(images, scores, 31, 16, 64, threshold=threshold).boxes)
    with torch.no_grad():
        logits = model(images)
        for b, n in enumerate(mosaic.lengths.tolist()):
            alone = model(model.tokenize(images[b:b + 1], n_patches=n))
            torch.testing.assert_close(logits[b:b + 1], alone, rtol=0, atol=float64_tolerance(alone))
    assert f"threshold={threshold!r}" in repr(model)
    # token_layout="packed": the same logits, through mixres.pack.
    packs = []
    monkeypatch.setattr(quadformer_module, "pack",
                        lambda mosaic, **kwargs: packs.append(mosaic) or mixres.pack(mosaic, **kwargs))
    model.token_layout = "packed"
    with torch.no_grad():
        torch.testing.assert_close(model(images), logits, rtol=0, atol=float64_tolerance(logits))
    assert len(packs) == 1 and torch.equal(packs[0].lengths, mosaic.lengths)
    model.threshold = None
    assert not model.tokenize(images).is_padded
    with torch.no_grad():
        model(images)
    assert len(packs) == 1  # a fixed budget has no padding to pack


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(threshold="high"), TypeError, "threshold"), (dict(threshold=float("nan")), ValueError, "threshold"),
    (dict(threshold={32: 0.1}), ValueError, "threshold"),
    (dict(token_layout="nested"), ValueError, "token_layout must be one of 'padded', 'packed', got 'nested'")])
def test_a_bad_threshold_or_layout_fails_when_the_model_is_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        timm.create_model("quadformer_vit_tiny_patch16_224", img_size=IMAGE_SIZE, embed_dim=32, depth=1, num_heads=2,
                          **kwargs)


def test_packed_rows_are_rounded_to_a_few_shapes():
    """token_layout="packed" rounds the rows up (quadformer.rounded_rows): never fewer than the leaves, at most 1/16
    more (or 8), and few distinct counts, so that per-shape kernel caches stay small."""
    totals = range(1, 20_000)
    rounded = [quadformer_module.rounded_rows(total) for total in totals]
    assert all(total <= rows <= max(total + 7, total * 17 // 16 + 1) for total, rows in zip(totals, rounded))
    assert len(set(rounded)) < 250
    assert len({quadformer_module.rounded_rows(total) for total in range(2049, 4097)}) == 16  # steps of 128
