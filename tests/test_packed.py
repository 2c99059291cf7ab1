"""Packed mosaics (issue 15, items 3 and 4): mixres.pack and PackedMosaic.unpack (the dynamic layout, the static one
of T_max rows, their errors), and the Quadformer on packed rows: image b's logits are its padded-batch logits (and
so its logits alone) for every pooling, position embedding, attention implementation and block kind, gradients and
stochastic depth included; torch.compile; CUDA without host synchronisation, in CUDA graphs, and its device-side
assert.

The expected packed layout is built here image by image from docs/design.md's definition (each image's valid leaves,
one image after the other), sharing no code with mixres.pack."""
import dataclasses
import importlib.util

import pytest
import torch
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock

import mixres
from mixres.models import Quadformer

from helpers import (captured_in_cuda_graph, float64_tolerance, pad_mosaics, raising_on_host_sync, random_mosaic,
                     run_script)
from test_models_padded import IMAGE_SIZE, LENGTHS, POOLINGS, single_mosaics, tiny_quadformer, use_fused_attention

# The attention implementations that run on the CPU ("varlen" is flash attention's, CUDA only).
CPU_ATTENTIONS = ("loop", "padded")
# torch.nn.attention.varlen (PyTorch 2.10 and later), which its package does not import.
HAS_VARLEN = importlib.util.find_spec("torch.nn.attention.varlen") is not None


def expected_rows(mosaic, lengths):
    """Each image's first lengths[b] leaves, one image after the other: (tokens, boxes, centers)."""
    return tuple(torch.cat([values[b, :n] for b, n in enumerate(lengths)])
                 for values in (mosaic.tokens, mosaic.boxes, mosaic.centers))


def padded_batch(dtype=torch.float64):
    model = tiny_quadformer("xy", dtype=dtype)
    return pad_mosaics(single_mosaics(model))


def assert_same_mosaic(got, want):
    for name in ("tokens", "boxes", "centers", "lengths"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert getattr(got, name).dtype == getattr(want, name).dtype, name
    assert (got.min_patch_size, got.image_size) == (want.min_patch_size, want.image_size)


# ------------------------------------------------------------------------------------------------- the layout
def test_pack_holds_each_images_valid_leaves_in_order_and_unpacks_to_the_same_mosaic():
    padded = padded_batch()
    packed = mixres.pack(padded)
    tokens, boxes, centers = expected_rows(padded, LENGTHS)
    assert torch.equal(packed.tokens, tokens) and torch.equal(packed.boxes, boxes)
    assert torch.equal(packed.centers, centers)
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [0, 16, 47, 54]
    assert packed.max_seqlen == max(LENGTHS) and packed.total_tokens == sum(LENGTHS) and packed.batch_size == 3
    assert packed.lengths.tolist() == list(LENGTHS)
    assert packed.batch_index.tolist() == [b for b, n in enumerate(LENGTHS) for _ in range(n)]
    assert packed.valid.all()
    assert packed.flat_tokens().shape == (sum(LENGTHS), 3 * 16 * 16)
    assert torch.equal(packed.tokens_channels_last, tokens.permute(0, 2, 3, 1))
    assert_same_mosaic(packed.unpack(), padded)  # the longest image is N_max long here
    wider = packed.unpack(n_patches=40)
    assert wider.tokens.shape[1] == 40 and torch.equal(wider.tokens[:, :31], padded.tokens)
    assert not wider.tokens[:, 31:].any() and not wider.boxes[:, 31:].any() and (wider.centers[:, 31:] == -0.5).all()


def test_an_unpadded_mosaic_packs_without_a_copy_and_unpacks_with_full_lengths():
    _, mosaic = random_mosaic(batch=3, n_patches=30)
    packed = mixres.pack(mosaic)
    tokens, boxes, centers = expected_rows(mosaic, [30] * 3)
    assert torch.equal(packed.tokens, tokens) and torch.equal(packed.boxes, boxes)
    assert torch.equal(packed.centers, centers)
    assert packed.tokens.data_ptr() == mosaic.tokens.data_ptr()
    assert packed.cu_seqlens.tolist() == [0, 30, 60, 90] and packed.max_seqlen == 30
    assert_same_mosaic(packed.unpack(), dataclasses.replace(mosaic, lengths=torch.full((3,), 30)))


@pytest.mark.parametrize("padded", [True, False])
def test_the_static_variant_has_total_tokens_rows_with_a_tail_of_padding(padded):
    if padded:
        mosaic, lengths = padded_batch(), LENGTHS
    else:
        mosaic, lengths = random_mosaic(batch=2, n_patches=30)[1], (30, 30)
    width = mosaic.tokens.shape[1]
    valid = sum(lengths)
    for total in (valid, valid + 9):
        packed = mixres.pack(mosaic, total_tokens=total)
        assert packed.total_tokens == total and packed.max_seqlen == width
        tokens, boxes, centers = expected_rows(mosaic, lengths)
        assert torch.equal(packed.tokens[:valid], tokens) and torch.equal(packed.boxes[:valid], boxes)
        assert torch.equal(packed.centers[:valid], centers)
        # The tail: padding as a padded mosaic's, in no image.
        assert not packed.tokens[valid:].any() and not packed.boxes[valid:].any()
        assert (packed.centers[valid:] == -0.5).all()
        assert packed.valid.tolist() == [True] * valid + [False] * (total - valid)
        assert packed.batch_index[valid:].tolist() == [len(lengths)] * (total - valid)
        assert packed.cu_seqlens.tolist()[-1] == valid
        assert_same_mosaic(packed.unpack(width), dataclasses.replace(mosaic, lengths=torch.tensor(lengths)))


def test_pack_and_unpack_pass_gradients_to_the_valid_leaves_only():
    padded = padded_batch()
    tokens = padded.tokens.clone().requires_grad_()
    packed = mixres.pack(dataclasses.replace(padded, tokens=tokens), total_tokens=60)
    weights = torch.randn(packed.tokens.shape, dtype=torch.float64)
    (packed.tokens * weights).sum().backward()
    for b, n in enumerate(LENGTHS):
        start = sum(LENGTHS[:b])
        assert torch.equal(tokens.grad[b, :n], weights[start:start + n])
        assert not tokens.grad[b, n:].any()
    tokens.grad = None
    packed = mixres.pack(dataclasses.replace(padded, tokens=tokens), total_tokens=60)
    (packed.unpack(31).tokens * padded.tokens).sum().backward()
    assert torch.equal(tokens.grad, padded.tokens)  # padding is 0 in padded.tokens


def test_pack_errors_name_the_argument():
    padded = padded_batch()
    with pytest.raises(ValueError, match=r"total_tokens=53 is below the mosaic's 54 valid leaves"):
        mixres.pack(padded, total_tokens=53)
    _, unpadded = random_mosaic(batch=2, n_patches=30)
    with pytest.raises(ValueError, match=r"total_tokens=59 is below the mosaic's 2 x 30 = 60 leaves"):
        mixres.pack(unpadded, total_tokens=59)
    for bad, error in [(0, ValueError), (10.0, TypeError), (True, TypeError), (torch.tensor(60), TypeError)]:
        with pytest.raises(error, match="total_tokens must be a positive int"):
            mixres.pack(padded, total_tokens=bad)
    with pytest.raises(TypeError, match="mosaic must be a mixres.Mosaic, got Tensor"):
        mixres.pack(padded.tokens)
    for lengths in ([0, 31, 7], [16, 32, 7]):
        with pytest.raises(ValueError, match=r"mosaic.lengths must be from 1 to N = 31"):
            mixres.pack(dataclasses.replace(padded, lengths=torch.tensor(lengths)))
        with pytest.raises(ValueError, match=r"mosaic.lengths must be from 1 to N = 31"):
            mixres.pack(dataclasses.replace(padded, lengths=torch.tensor(lengths)), total_tokens=93)
    with pytest.raises(TypeError, match="mosaic.lengths must be int32 or int64"):
        mixres.pack(dataclasses.replace(padded, lengths=padded.lengths.float()))
    with pytest.raises(ValueError, match=r"n_patches must be an int >= max_seqlen = 31"):
        mixres.pack(padded).unpack(30)


# ------------------------------------------------------------------------------------------------- the model
def packings(padded):
    """The dynamic packing and a static one with a tail."""
    return {"dynamic": mixres.pack(padded), "static": mixres.pack(padded, total_tokens=sum(LENGTHS) + 5)}


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("pos_embed", ["resample", "xy", "xy-learned"])
def test_each_image_of_a_packed_batch_gets_its_padded_batch_logits(pos_embed, pooling):
    model = tiny_quadformer(pos_embed, **POOLINGS[pooling])
    singles = single_mosaics(model)
    padded = pad_mosaics(singles)
    n_prefix = model.vit.num_prefix_tokens
    starts = [sum(LENGTHS[:b]) + b * n_prefix for b in range(len(LENGTHS) + 1)]
    for fused in (True, False):
        use_fused_attention(model, fused)
        with torch.no_grad():
            want = model(padded)
            alone = [model(mosaic)[0] for mosaic in singles]
        for (layout, packed), attention in [(item, how) for item in packings(padded).items() for how in CPU_ATTENTIONS]:
            model.packed_attention = attention
            with torch.no_grad():
                got = model(packed)
                features = model.forward_features(packed)
            where = f"fused {fused}, {layout}, {attention}"
            if pooling == "none":  # per-row logits, packed: each image's prefix and leaves
                assert got.shape == (packed.total_tokens + len(LENGTHS) * n_prefix, 5)
                rows = [got[starts[b]:starts[b + 1]] for b in range(len(LENGTHS))]
                wants = [want[b, :n_prefix + n] for b, n in enumerate(LENGTHS)]
            else:
                rows, wants = got, want
            for b in range(len(LENGTHS)):
                torch.testing.assert_close(rows[b], wants[b], rtol=0, atol=float64_tolerance(wants[b]),
                                           msg=lambda text: f"image {b}, {where}: {text}")
                reference = alone[b][:n_prefix + LENGTHS[b]] if pooling == "none" else alone[b]
                torch.testing.assert_close(rows[b], reference, rtol=0, atol=float64_tolerance(reference),
                                           msg=lambda text: f"image {b} alone, {where}: {text}")
            assert torch.isfinite(features).all()  # the tail's rows too
    # The control: one leaf moved from image 1 to image 0 (their boundary one row later) moves image 0's logits far
    # beyond the tolerance, which therefore sees one token's leak.
    packed = mixres.pack(padded)
    moved = packed.cu_seqlens.clone()
    moved[1] += 1
    with torch.no_grad():
        leaked = model(dataclasses.replace(packed, cu_seqlens=moved, max_seqlen=packed.max_seqlen + 1))
    got, reference = (leaked[:starts[1] + 1], want[0, :starts[1]]) if pooling == "none" else (leaked[0], want[0])
    assert (got[:reference.shape[0]] - reference).abs().max() > 1000 * float64_tolerance(reference)


@pytest.mark.parametrize("vit_kwargs", [dict(qk_norm=True, init_values=0.5), dict(block_fn=ResPostBlock)],
                         ids=["qk_norm-layer_scale", "ResPostBlock"])
def test_the_blocks_options_run_packed_as_padded(vit_kwargs):
    """The attention's q_norm and k_norm, layer scales, and the post-norm block, read from the ViT's own modules."""
    model = tiny_quadformer("xy", **vit_kwargs)
    padded = pad_mosaics(single_mosaics(model))
    with torch.no_grad():
        want = model(padded)
        for attention in CPU_ATTENTIONS:
            model.packed_attention = attention
            got = model(mixres.pack(padded, total_tokens=60))
            torch.testing.assert_close(got, want, rtol=0, atol=float64_tolerance(want), msg=attention)


def test_packed_features_are_each_images_padded_features_with_its_prefix_in_front():
    model = tiny_quadformer("resample", **POOLINGS["avg_with_prefix"])  # a class token and two registers
    padded = pad_mosaics(single_mosaics(model))
    packed = mixres.pack(padded, total_tokens=60)
    with torch.no_grad():
        want = model.forward_features(padded)
        got = model.forward_features(packed)
        pooled = model.forward_head(got, pre_logits=True, packed=packed)
        pooled_padded = model.forward_head(want, pre_logits=True, valid=padded.valid)
    assert got.shape == (60 + 3 * 3, 32)
    start = 0
    for b, n in enumerate(LENGTHS):
        torch.testing.assert_close(got[start:start + 3 + n], want[b, :3 + n], rtol=0,
                                   atol=float64_tolerance(want[b, :3 + n]))
        start += 3 + n
    torch.testing.assert_close(pooled, pooled_padded, rtol=0, atol=float64_tolerance(pooled_padded))


@pytest.mark.parametrize("block_fn", ["Block", "ResPostBlock"])
def test_packed_training_gives_the_padded_gradients_and_stochastic_depth_per_image(block_fn):
    """Dropout is off and drop path on: with the same random state, the packed forward drops the images the padded
    one drops (timm draws one number per image), so the losses and every gradient agree."""
    extra = {} if block_fn == "Block" else {"block_fn": ResPostBlock}
    model = tiny_quadformer("xy-learned", drop_path_rate=0.5, **extra, **POOLINGS["avgmax"]).train()
    singles = single_mosaics(model)
    padded = pad_mosaics(singles)
    weights = torch.randn(len(LENGTHS), 5, dtype=torch.float64)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    results = {}
    for layout, checkpointing in [("padded", False), ("loop", False), ("padded-attention", True), ("loop", True)]:
        model.set_grad_checkpointing(checkpointing)
        model.packed_attention = "padded" if layout == "padded-attention" else "loop"
        tokens = padded.tokens.clone().requires_grad_()
        mosaic = dataclasses.replace(padded, tokens=tokens)
        model.zero_grad()
        torch.manual_seed(7)
        logits = model(mosaic if layout == "padded" else mixres.pack(mosaic, total_tokens=60))
        (logits * weights).sum().backward()
        results[layout, checkpointing] = (logits.detach(), tokens.grad, [p.grad.clone() for p in parameters])
    want_logits, want_tokens, want_grads = results["padded", False]
    for key, (logits, tokens_grad, grads) in results.items():
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=float64_tolerance(want_logits), msg=str(key))
        torch.testing.assert_close(tokens_grad, want_tokens, rtol=0, atol=float64_tolerance(want_tokens))
        assert not tokens_grad[~padded.valid].any()
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=float64_tolerance(want), msg=str(key))
    # The drop path did drop: another random state gives other logits.
    torch.manual_seed(8)
    model.set_grad_checkpointing(False)
    with torch.no_grad():
        other = model(mixres.pack(padded))
    assert (other - want_logits).abs().max() > 1000 * float64_tolerance(want_logits)


def test_the_static_packed_forward_compiles_with_fullgraph_and_matches_eager():
    model = tiny_quadformer("resample", dtype=torch.float32, **POOLINGS["avg_with_prefix"])
    padded = pad_mosaics(single_mosaics(model))
    torch._dynamo.reset()
    compiled = torch.compile(lambda mosaic: model(mixres.pack(mosaic, total_tokens=60)), fullgraph=True,
                             backend="aot_eager")
    model.packed_attention = "padded"  # what "auto" runs under torch.compile: the rows' bounds stay on the device
    with torch.no_grad():
        # aot_eager runs the eager kernels: the same numbers.
        torch.testing.assert_close(compiled(padded), model(mixres.pack(padded, total_tokens=60)), rtol=0, atol=0)
    torch._dynamo.reset()


def test_what_cannot_read_a_packed_mosaic_says_so():
    model = tiny_quadformer(global_pool="prr")
    packed = mixres.pack(pad_mosaics(single_mosaics(model)))
    with pytest.raises(ValueError, match="AttentionPoolPrr .*global_pool='prr'.* takes no mask"):
        model(packed)

    model = tiny_quadformer(patch_drop_rate=0.5).train()
    with pytest.raises(ValueError, match="patch dropout .* packed or padded mosaic while training"):
        model(packed)
    model.eval()
    with pytest.raises(ValueError, match="n_patches=31 was given with a packed mosaic"):
        model(packed, n_patches=31)
    with pytest.raises(ValueError, match="forward_head takes valid .* or packed .*, not both"):
        model.forward_head(model.forward_features(packed), valid=torch.ones(3, 31, dtype=torch.bool), packed=packed)
    model.packed_attention = "flash"
    with pytest.raises(ValueError, match="packed_attention must be one of 'auto', 'loop', 'varlen', 'padded'"):
        model(packed)

    vit_kwargs = dict(img_size=IMAGE_SIZE, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    from timm.models.vision_transformer import VisionTransformer

    model = Quadformer(VisionTransformer(block_fn=ParallelScalingBlock, **vit_kwargs), n_patches=31).double().eval()
    with pytest.raises(TypeError, match="block 0 has a ParallelScalingBlock: use a padded mosaic"):
        model(packed)
    model = Quadformer(VisionTransformer(**vit_kwargs), n_patches=31).double().eval()

    class OtherAttention(type(model.vit.blocks[1].attn)):
        pass

    model.vit.blocks[1].attn.__class__ = OtherAttention
    with pytest.raises(TypeError, match="block 1 has attention OtherAttention"):
        model(packed)


# ----------------------------------------------------------------------------------------------------------- CUDA
def cuda_mosaics(singles, dtype=torch.float32):
    return [dataclasses.replace(mosaic, tokens=mosaic.tokens.to("cuda", dtype), boxes=mosaic.boxes.cuda(),
                                centers=mosaic.centers.cuda()) for mosaic in singles]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pooling", ["token", "avgmax", "map"])
def test_the_static_packed_forward_on_cuda_does_not_synchronize_and_matches_float64(pooling):
    model = tiny_quadformer("resample", **POOLINGS[pooling])
    singles = single_mosaics(model)
    with torch.no_grad():
        truth = [model(mosaic)[0] for mosaic in singles]
    model = model.float().cuda()
    padded = pad_mosaics(cuda_mosaics(singles))

    def run():
        return model(mixres.pack(padded, total_tokens=60))

    with torch.no_grad():
        for attention in ("auto", "padded", "loop"):  # "auto" is "padded" in float32
            model.packed_attention = attention
            run()  # warm-up: lazy initialisation may synchronize once
            torch.cuda.synchronize()
            with raising_on_host_sync(attention != "loop"):  # the loop reads the images' bounds on the host
                logits = run()
            # float32 on the GPU against float64 on the CPU: 64 units of 2^-24 of the largest logit, as for padded.
            for b, want in enumerate(truth):
                torch.testing.assert_close(logits[b].cpu().double(), want, rtol=0,
                                           atol=64 * 2**-24 * want.abs().max().item(), msg=attention)
        model.packed_attention = "padded"
        graph, captured = captured_in_cuda_graph(run)
        captured.zero_()
        graph.replay()
    for b, want in enumerate(truth):
        torch.testing.assert_close(captured[b].cpu().double(), want, rtol=0, atol=64 * 2**-24 * want.abs().max().item())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not HAS_VARLEN, reason="needs torch.nn.attention.varlen (PyTorch 2.10)")
@pytest.mark.parametrize("packing", ["dynamic", "static"])
def test_varlen_attention_on_cuda_in_bfloat16_matches_the_padded_attention(packing):
    """Flash attention's varlen kernel ("auto" in bfloat16) against the padded layout's attention, both under
    bfloat16 autocast: bfloat16 roundings in another order, a few times on the way: 8 units of 2^-8 of the largest
    logit. The tail's rows (static) stay finite."""
    model = tiny_quadformer("xy", dtype=torch.float32, **POOLINGS["avgmax"])
    padded = pad_mosaics(cuda_mosaics(single_mosaics(model)))  # tokenized on the CPU, before the model moves
    model = model.cuda()
    packed = mixres.pack(padded, total_tokens=60) if packing == "static" else mixres.pack(padded)
    results = {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for attention in ("varlen", "auto", "padded"):
            model.packed_attention = attention
            results[attention] = model(packed).float()
            torch.cuda.synchronize()
            with raising_on_host_sync():
                features = model.forward_features(packed)
            assert torch.isfinite(features).all()
    assert torch.equal(results["auto"], results["varlen"])
    want = results["padded"]
    torch.testing.assert_close(results["varlen"], want, rtol=0, atol=8 * 2**-8 * want.abs().max().item())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_static_pack_on_cuda_asserts_on_the_device_when_total_tokens_is_too_small():
    """Checking on the host would synchronise: a device-side assert, which ends the process's CUDA context, so in a
    subprocess. Where asserts are compiled out, the rows past T_max are cut."""
    run_script("""
import torch, mixres
from helpers import pad_mosaics, random_mosaic
_, mosaic = random_mosaic(batch=2, n_patches=30)
mosaic = mixres.Mosaic(mosaic.tokens.cuda(), mosaic.boxes.cuda(), mosaic.centers.cuda(), 16, mosaic.image_size,
                       lengths=torch.tensor([30, 30], device="cuda"))
try:
    packed = mixres.pack(mosaic, total_tokens=50)
    torch.cuda.synchronize()
except RuntimeError as error:
    assert "device-side assert" in str(error) or "CUDA error" in str(error) or "total_tokens=50" in str(error), error
else:
    assert packed.total_tokens == 50
""")
