"""The fixture tests/data/quadformer_checkpoints_e83975a.pt: tiny Quadformers' state dicts as mixres saved them at
commit e83975a (before the position embeddings became modules), one per pos_embed kind, with the images they were
run on and the logits that code computed, and those of a UniformGrid around the ``xy-learned`` one (whose state dict
is that Quadformer's under ``quadformer.``). test_models loads them with today's code: the checkpoint layout
(``xy_embed.y_table``...) and the logits must stay.

Made by this file, run from a checkout of that commit (its extension built) with its mixres first on the path:
``PYTHONPATH=. python $NEW/tests/old_checkpoints.py $NEW/tests/data/quadformer_checkpoints_e83975a.pt``, where
$NEW is this checkout.
"""
import sys

import torch
from timm.models.vision_transformer import VisionTransformer

PATH = "quadformer_checkpoints_e83975a.pt"
KINDS = ("resample", "xy", "xy-learned")
N_PATCHES = 25  # of 4-16 px leaves on 32 px images: 4 roots and 7 splits
UNIFORM_GRID = 5  # rows and cols of the UniformGrid's run


def tiny_vit(seed: int) -> VisionTransformer:
    """A ViT of 4 px patches on 32 px images (every weight random: timm starts some at zero)."""
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=8, depth=1, num_heads=2, mlp_ratio=1.0,
                            num_classes=3).eval()
    with torch.no_grad():
        for parameter in vit.parameters():
            parameter.normal_(std=0.5)
    return vit


def images() -> torch.Tensor:
    """Two 32 px images of 8-bit pixels (stored as such in the fixture: small, and exact on any machine)."""
    return torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def pixels(stored: torch.Tensor) -> torch.Tensor:
    return stored.float() / 255


def main(path: str) -> None:
    from mixres.models import Quadformer, UniformGrid

    stored = images()
    fixture = {"images": stored, "state": {}, "logits": {}}
    for seed, kind in enumerate(KINDS):
        torch.manual_seed(seed)
        model = Quadformer(tiny_vit(seed), n_patches=N_PATCHES, scorer="pixel-blur", pos_embed=kind).eval()
        with torch.no_grad():
            for table in model.parameters():  # the learned xy tables too
                table.normal_(std=0.5)
            fixture["state"][kind] = model.state_dict()
            fixture["logits"][kind] = model(pixels(stored))
    grid = UniformGrid(model)  # the last one, xy-learned
    assert grid.state_dict().keys() == {f"quadformer.{key}" for key in fixture["state"]["xy-learned"]}
    with torch.no_grad():
        fixture["logits"]["uniform grid"] = grid(pixels(stored), grid=UNIFORM_GRID)
    torch.save(fixture, path)


if __name__ == "__main__":
    main(sys.argv[1])
