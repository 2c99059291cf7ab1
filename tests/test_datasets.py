"""mixres.datasets.SmallObjects: a small digit on a faint texture. Its items, their determinism, the digit's box,
and the claim the dataset exists for: a content-aware scorer gives the digit small leaves."""
import numpy as np
import pytest
import torch

import mixres

pytest.importorskip("skimage")

from mixres.datasets import SmallObjects, make_split  # noqa: E402  (after the skip: the textures need scikit-image)


@pytest.fixture(scope="module")
def val64():
    """The first 64 val items at the defaults: images [64, 3, 256, 256], labels [64], boxes [64, 4]."""
    return SmallObjects("val", 64).tensors(return_boxes=True)


def test_items_are_rgb_images_in_the_unit_range_with_a_label():
    dataset = SmallObjects("train", 5, image_size=128, num_classes=4)
    assert len(dataset) == 5
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        assert isinstance(label, int) and 0 <= label < 4
    assert torch.equal(dataset[-1][0], dataset[4][0])
    with pytest.raises(IndexError, match="out of range"):
        dataset[5]


def test_tensors_stack_the_items():
    dataset = SmallObjects("train", 6, image_size=64)
    images, labels, boxes = dataset.tensors(return_boxes=True)
    assert images.shape == (6, 3, 64, 64) and labels.shape == (6,) and boxes.shape == (6, 4)
    assert labels.dtype == boxes.dtype == torch.int64
    for index in range(6):
        image, label, box = dataset.item(index)
        assert torch.equal(images[index], image) and labels[index] == label and tuple(boxes[index].tolist()) == box
        assert dataset.box(index) == box
    part, part_labels = dataset.tensors(2, start=3)
    assert torch.equal(part, images[3:5]) and torch.equal(part_labels, labels[3:5])
    compact, _ = dataset.tensors(dtype=torch.uint8)
    assert compact.dtype == torch.uint8 and torch.equal(compact, (images * 255).round().to(torch.uint8))
    made, made_labels = make_split("train", 6, image_size=64)
    assert torch.equal(made, images) and torch.equal(made_labels, labels)


def test_items_depend_only_on_split_seed_and_index():
    first, again = SmallObjects("train", 40, image_size=64), SmallObjects("train", 40, image_size=64)
    # In any order, from any instance: what a DataLoader's workers need.
    for index in (7, 0, 39, 7):
        assert torch.equal(first[index][0], again[index][0]) and first[index][1] == again[index][1]
    images = first.tensors()[0]
    for other in (SmallObjects("val", 40, image_size=64), SmallObjects("train", 40, image_size=64, seed=1)):
        other_images = other.tensors()[0]
        # Not one item in common, even at other indices.
        assert not (images[:, None] == other_images[None]).flatten(2).all(dim=2).any()
    # Nor within a split.
    assert not (images[:, None] == images[None]).flatten(2).all(dim=2).fill_diagonal_(False).any()


def test_labels_are_balanced():
    # Each aligned run of num_classes items holds every class once.
    for num_classes in (10, 3):
        labels = SmallObjects("train", 20 * num_classes, image_size=64, num_classes=num_classes).tensors()[1]
        assert torch.equal(labels.bincount(minlength=num_classes), torch.full((num_classes,), 20))
        assert len(set(labels[:50].tolist())) == num_classes
        runs = {tuple(run) for run in labels.view(20, num_classes).tolist()}
        assert len(runs) > 1  # not one fixed order


def test_the_digit_is_inside_its_box_and_fills_it():
    dataset = SmallObjects("val", 24)
    for index in range(len(dataset)):
        image, _, (y0, x0, y1, x1) = dataset.item(index)
        assert 0 <= y0 < y1 <= 256 and 0 <= x0 < x1 <= 256
        assert 5 <= y1 - y0 <= 16 and 2 <= x1 - x0 <= 16  # font sizes 11-17, rotated by up to 15 degrees
        # The background alone, from the item's own parameters: the digit changes the image only in its box,
        # and touches every side of the box (the box is tight).
        painted = (image.numpy() != dataset._background(dataset._draw(index)[0])).any(axis=0)
        inside = np.zeros_like(painted)
        inside[y0:y1, x0:x1] = True
        assert not painted[~inside].any()
        assert painted[y0].any() and painted[y1 - 1].any() and painted[:, x0].any() and painted[:, x1 - 1].any()


def test_the_digit_stands_out_from_the_texture(val64):
    # The digit's luma is at least 0.35 from the background's mean under it, and the texture is faint (std 0.015
    # to 0.035 before tinting). Measured over these 64 items: the largest luma difference between the box and the
    # median of a 3 px ring around it is 0.35 to 0.63; the image's luma std (texture and digit) is 0.016 to 0.040.
    images, _, boxes = val64
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    for grey, (y0, x0, y1, x1) in zip(luma, boxes.tolist()):
        around = grey[max(0, y0 - 3):y1 + 3, max(0, x0 - 3):x1 + 3].clone()
        around[y0 - max(0, y0 - 3):, x0 - max(0, x0 - 3):][:y1 - y0, :x1 - x0] = float("nan")
        background = around.nanmedian()
        assert (grey[y0:y1, x0:x1] - background).abs().max() > 0.3
        assert grey.std() < 0.05


def side_map(leaves: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, 3]`` leaves (y, x, side) -> ``[size, size]``, the side of the leaf over each pixel."""
    sides = torch.zeros(size, size)
    for y, x, side in leaves.tolist():
        sides[y:y + side, x:x + side] = side
    return sides


def digit_leaves(images, boxes, scorer, n_patches):
    """(fraction of items whose digit's centre lies in a 16 px leaf, mean over items of the mean leaf side
    elsewhere / over the digit's box)."""
    leaves = mixres.tokenize(images, scorer, n_patches=n_patches).boxes
    in_small, ratios = [], []
    for item_leaves, (y0, x0, y1, x1) in zip(leaves, boxes.tolist()):
        sides = side_map(item_leaves, images.shape[-1])
        in_small.append(sides[(y0 + y1) // 2, (x0 + x1) // 2] == 16)
        inside = torch.zeros_like(sides, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        ratios.append(sides[~inside].mean() / sides[inside].mean())
    return torch.tensor(in_small).float().mean().item(), torch.tensor(ratios).mean().item()


# Measured on these 64 items (256 px, 16-64 px leaves), n_patches = 64 (16 roots of 64 px + 16 splits): the
# fraction of digits centred in a 16 px leaf, and the mean leaf side elsewhere / over the digit's box:
#   PixelBlur: 1.00 (64 of 64), ratio 2.06;   Entropy: 0.69, ratio 2.27;   Random(seed=0): 0.09, ratio 1.11.
# Over 512 items: PixelBlur 0.98, Entropy 0.70. (At n_patches=40 and 100, on these 64: PixelBlur 0.92 and 1.00,
# Entropy 0.41 and 0.92.) benchmarks/small_objects_legibility.py measures them (with --val-items 64, on these 64).
# Random(seed=0) draws one pyramid for every image of a shape: one random mosaic.
# 16 splits could as well make the uniform 32 px grid (every root split once), with no 16 px leaf: a 16 px leaf on
# the digit means the scorer ranked the digit's 32 px patch above whole roots of texture.
def test_pixel_blur_gives_the_digit_16px_leaves(val64):
    images, _, boxes = val64
    found, ratio = digit_leaves(images, boxes, mixres.PixelBlur(16, 64), 64)
    assert found > 0.9
    assert ratio > 1.5


def test_entropy_finds_the_digit_too_and_random_does_not(val64):
    images, _, boxes = val64
    found_entropy, _ = digit_leaves(images, boxes, mixres.Entropy(16, 64), 64)
    found_random, ratio_random = digit_leaves(images, boxes, mixres.Random(16, 64, seed=0), 64)
    assert 0.5 < found_entropy
    assert found_random < 0.2 and 0.7 < ratio_random < 1.3


# -- objects=(lo, hi): several digits, the label the largest ------------------------------------------------------

def test_one_object_is_the_single_digit_dataset():
    single, explicit = SmallObjects("val", 12), SmallObjects("val", 12, objects=(1, 1))
    images, labels, boxes = single.tensors(return_boxes=True)
    images_explicit, labels_explicit, boxes_explicit = explicit.tensors(return_boxes=True)
    assert torch.equal(images, images_explicit) and torch.equal(labels, labels_explicit)
    assert torch.equal(boxes, boxes_explicit)
    for index in range(12):
        assert single.boxes(index) == [single.box(index)] and single.digits(index) == [int(labels[index])]


def apart(box, other, gap):
    """Whether boxes (y0, x0, y1, x1) are at least ``gap`` px apart along y or x, written from the definition."""
    rows_apart = max(box[0], other[0]) - min(box[2], other[2]) >= gap
    cols_apart = max(box[1], other[1]) - min(box[3], other[3]) >= gap
    return rows_apart or cols_apart


def test_several_objects_lie_inside_apart_and_the_label_is_the_largest():
    dataset = SmallObjects("train", 200, objects=(1, 4))
    counts = []
    for index in range(len(dataset)):
        boxes, digits = dataset.boxes(index), dataset.digits(index)
        label = dataset[index][1]
        assert len(boxes) == len(digits) and 1 <= len(boxes) <= 4
        counts.append(len(boxes))
        assert digits[0] == label == max(digits) and all(0 <= digit <= label for digit in digits)
        assert boxes[0] == dataset.box(index)
        for number, (y0, x0, y1, x1) in enumerate(boxes):
            assert 0 <= y0 < y1 <= 256 and 0 <= x0 < x1 <= 256 and y1 - y0 <= 16 and x1 - x0 <= 16
            assert all(apart(boxes[number], other, 4) for other in boxes[number + 1:])
    # Every count from 1 to 4, about equally often (50 expected each).
    assert sorted(set(counts)) == [1, 2, 3, 4] and min(counts.count(k) for k in (1, 2, 3, 4)) > 30
    # Some images repeat their largest digit, and smaller ones come in every value.
    others = [digit for index in range(len(dataset)) for digit in dataset.digits(index)[1:]]
    assert set(others) == set(range(10))


def test_several_objects_are_painted_each_in_its_box():
    dataset = SmallObjects("val", 12, objects=(2, 4))
    for index in range(len(dataset)):
        image, label, box = dataset.item(index)
        assert box == dataset.boxes(index)[0] and label == max(dataset.digits(index))
        painted = (image.numpy() != dataset._background(dataset._draw(index)[0])).any(axis=0)
        inside = np.zeros_like(painted)
        for y0, x0, y1, x1 in dataset.boxes(index):
            inside[y0:y1, x0:x1] = True
            # Each digit touches every side of its box: it is painted, and its box is tight.
            assert painted[y0, x0:x1].any() and painted[y1 - 1, x0:x1].any()
            assert painted[y0:y1, x0].any() and painted[y0:y1, x1 - 1].any()
        assert not painted[~inside].any()


def test_several_objects_depend_only_on_split_seed_and_index():
    first, again = SmallObjects("train", 30, objects=(1, 4)), SmallObjects("train", 30, objects=(1, 4))
    for index in (11, 0, 29, 11):
        assert torch.equal(first[index][0], again[index][0]) and first.boxes(index) == again.boxes(index)
    images, labels = first.tensors()
    assert torch.equal(labels.bincount(minlength=10), torch.full((10,), 3))  # still balanced
    for other in (SmallObjects("val", 30, objects=(1, 4)), SmallObjects("train", 30, seed=1, objects=(1, 4))):
        other_images = other.tensors()[0]
        assert not (images[:, None] == other_images[None]).flatten(2).all(dim=2).any()
    assert not (images[:, None] == images[None]).flatten(2).all(dim=2).fill_diagonal_(False).any()


# What objects=(lo, hi) is for: a threshold calibrated for a mean of 40 tokens gives the images with more digits
# more tokens. Measured on these 96 items (20, 28, 26, 22 images of 1, 2, 3, 4 digits): 35.5, 36.7, 40.8 and 47.4
# tokens on average. benchmarks/adaptive_budgets_coverage.py measures it on 2000 items (in its results/ file).
def test_adaptive_budgets_give_images_with_more_digits_more_tokens():
    dataset = SmallObjects("val", 96, objects=(1, 4))
    images = dataset.tensors()[0]
    counts = torch.tensor([len(dataset.boxes(index)) for index in range(len(dataset))])
    scorer = mixres.PixelBlur(16, 64)
    calibration = mixres.calibrate_threshold(scorer, images, mean_tokens=40)
    lengths = mixres.tokenize(images, scorer, n_patches=256, threshold=calibration.thresholds).lengths.float()
    by_count = [lengths[counts == k].mean().item() for k in (1, 2, 3, 4)]
    assert by_count[3] > by_count[0] + 8 and by_count[2] > by_count[0]


def test_images_larger_than_the_textures_tile_them():
    image, _ = SmallObjects("train", 1, image_size=576)[0]  # the textures are 512 x 512
    assert image.shape == (3, 576, 576)


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "test"}, "split must be 'train' or 'val'"),
    ({"image_size": 100}, "image_size must be a positive multiple of 64"),
    ({"image_size": 0}, "image_size must be a positive multiple of 64"),
    ({"object_size": (7, 12)}, "object_size must be"),
    ({"object_size": (12, 11)}, "object_size must be"),
    ({"object_size": (12, 80), "image_size": 128}, "image_size // 2 = 64"),
    ({"num_classes": 11}, "num_classes must be an int from 2 to 10"),
    ({"length": -1}, "length must be an int >= 0"),
    ({"seed": -1}, "seed must be an int"),
    ({"background_contrast": (0.1, 0.05)}, "background_contrast must be"),
    ({"max_rotation": 90}, "max_rotation must be"),
    ({"objects": (0, 2)}, r"objects must be \(lo, hi\) with 1 <= lo <= hi"),
    ({"objects": (3, 2)}, r"objects must be \(lo, hi\) with 1 <= lo <= hi"),
    ({"objects": (1, 18)}, "objects allows up to 18 digits, too many for 256 px images at font size 17.*at most 17"),
    ({"objects": (1, 2), "image_size": 64}, "too many for 64 px images.*raise image_size"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SmallObjects(**kwargs)


def test_bad_argument_types_are_named():
    with pytest.raises(TypeError, match="object_size must be a pair of ints"):
        SmallObjects(object_size=12)
    with pytest.raises(TypeError, match="objects must be a pair of ints"):
        SmallObjects(objects=4)
    with pytest.raises(TypeError, match="background_contrast must be a pair of numbers"):
        SmallObjects(background_contrast="faint")
    with pytest.raises(ValueError, match="outside the dataset"):
        SmallObjects("train", 3).tensors(4)


def test_build_dataset_passes_generator_arguments_to_small_objects(tmp_path):
    from mixres.apps.loaders import build_dataset

    dataset = build_dataset("small-objects", "val", 64, (0.5,) * 3, (0.5,) * 3, train=False, length=4,
                            generator_kwargs={"object_size": [20, 24]})
    assert len(dataset) == 4 and dataset.dataset.object_size == (20, 24)
    image, _ = dataset[0]
    assert image.shape == (3, 64, 64) and image.min() >= -1 and image.max() <= 1  # normalised with 0.5, 0.5
    with pytest.raises(ValueError, match="generator arguments are for 'small-objects' data"):
        build_dataset(str(tmp_path), "val", 64, (0.5,) * 3, (0.5,) * 3, train=False,
                      generator_kwargs={"object_size": [20, 24]})
