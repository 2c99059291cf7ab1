"""mixres.apps.loaders: an image file that cannot be read names itself and the reason, read in the main process or in
DataLoader workers, and skip_unreadable_images leaves such files out, on one process and through a process group."""
import io
import multiprocessing
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Subset

from mixres.apps.loaders import (UnreadableImageError, build_dataset, build_loader, read_image, release_loader,
                         skip_unreadable_images)

NORMALISATION = ((0.5,) * 3, (0.5,) * 3)


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


# What each kind of bad file is, and the reason Pillow gives for it.
BAD_FILES = {
    "corrupt": "broken data stream when reading image file",  # zeros over the middle of the pixel data
    "truncated": "image file is truncated",  # the first half of a PNG
    "not an image": "not an image file that Pillow can identify",  # text named .png
}


def write_bad(kind: str, path) -> None:
    data = png_bytes(99)
    if kind == "corrupt":
        middle = len(data) // 2
        data = data[:middle] + bytes(16) + data[middle + 16:]
    elif kind == "truncated":
        data = data[:len(data) // 2]
    else:
        data = b"label,score\ncat,0.9\n"
    path.write_bytes(data)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of three readable 32 x 32 PNGs."""
    root = tmp_path_factory.mktemp("folder")
    for label in ("a", "b"):
        (root / label).mkdir()
        for index in range(3):
            (root / label / f"{index}.png").write_bytes(png_bytes(10 * ord(label) + index))
    return root


def with_bad_file(folder, tmp_path, kind):
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    bad = root / "a" / "1_bad.png"  # between 1.png and 2.png
    write_bad(kind, bad)
    return root, bad


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_an_unreadable_file_is_named_with_its_reason_and_can_be_skipped(folder, tmp_path, kind, workers):
    root, bad = with_bad_file(folder, tmp_path, kind)
    message = f"cannot read {bad}: {BAD_FILES[kind]}"
    with pytest.raises(UnreadableImageError, match="^cannot read"):
        read_image(bad)
    dataset = build_dataset(root, "train", 32, *NORMALISATION, train=False)
    assert len(dataset) == 7
    with pytest.raises(UnreadableImageError) as error:
        list(build_loader(dataset, 4, train=False, workers=workers))
    assert error.value.brief.startswith(message), error.value.brief  # from a worker too, which adds its traceback
    assert isinstance(error.value, OSError)
    release_loader(error.value)  # the loader's iterator is freed, and its workers have exited
    assert not multiprocessing.active_children()

    kept, problems = skip_unreadable_images(dataset, workers)
    assert [problem[:len(message)] for problem in problems] == [message]
    clean = build_dataset(folder, "train", 32, *NORMALISATION, train=False)
    assert len(kept) == 6 == len(clean)
    for (image, label), (clean_image, clean_label) in zip(kept, clean):  # the other files, in their order
        assert label == clean_label and torch.equal(image, clean_image)
    images, labels = next(iter(build_loader(kept, 6, train=False, workers=workers)))
    assert images.shape == (6, 3, 32, 32) and labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_skipping_keeps_a_subsets_order_and_changes_nothing_without_bad_files(folder, tmp_path):
    root, bad = with_bad_file(folder, tmp_path, "truncated")
    dataset = build_dataset(root, "train", 32, *NORMALISATION, train=False)
    subset = Subset(dataset, [6, 2, 1, 0])  # b/2.png, a/1_bad.png, a/1.png, a/0.png
    kept, problems = skip_unreadable_images(subset)
    assert kept.indices == [6, 1, 0] and len(problems) == 1 and str(bad) in problems[0]
    clean = build_dataset(folder, "train", 32, *NORMALISATION, train=False)
    assert skip_unreadable_images(clean) == (clean, [])
    with pytest.raises(ValueError, match="for image folders"):
        skip_unreadable_images(torch.utils.data.TensorDataset(torch.zeros(2, 3)))


def test_the_processes_of_a_group_exchange_what_they_found(folder, tmp_path):
    root, bad = with_bad_file(folder, tmp_path, "not an image")
    dataset = build_dataset(root, "train", 32, *NORMALISATION, train=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        kept, problems = skip_unreadable_images(dataset, distributed=True)
    finally:
        dist.destroy_process_group()
    assert len(kept) == 6 and problems == [f"cannot read {bad}: {BAD_FILES['not an image']}"]


@pytest.mark.parametrize("train", [False, True])
def test_16_bit_and_float_images_keep_their_values(tmp_path, train):
    """convert("RGB") would clip 16-bit grey to white (and truncate floats): such files are read by load_image.
    Constant images stay constant through any resize and crop, so each item must be exactly its value, normalised
    (training's colour jitter scales a constant, so there only constancy is checked)."""
    values = {"a": 40000 / 65535, "b": 0.375}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.full((40, 48), 40000, dtype=np.uint16)).save(tmp_path / "a" / "0.png")  # mode I;16
    Image.fromarray(np.full((40, 48), values["b"], dtype=np.float32)).save(tmp_path / "b" / "0.tif")  # mode F
    assert Image.open(tmp_path / "a" / "0.png").mode.startswith("I")
    dataset = build_dataset(tmp_path, "val", 32, *NORMALISATION, train=train)
    for index, (name, value) in enumerate(values.items()):
        image, label = dataset[index]
        assert label == index and image.shape == (3, 32, 32)
        if train:
            assert image.max() - image.min() < 1e-6
        else:
            torch.testing.assert_close(image, torch.full_like(image, (value - 0.5) / 0.5), rtol=0, atol=1e-6)


def test_a_float_image_outside_0_1_is_named(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((8, 8), 300.0, dtype=np.float32)).save(tmp_path / "a" / "hot.tif")
    with pytest.raises(UnreadableImageError, match=r"cannot read .*hot\.tif: a float image \(Pillow mode F\) with "
                                                    r"values from 300 to 300"):
        read_image(tmp_path / "a" / "hot.tif")
