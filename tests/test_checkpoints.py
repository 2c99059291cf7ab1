"""Weights of another configuration of the same model, and files that are no weights at all.

A Quadformer's weights load into another configuration where the change has a meaning (another image size or
min_patch_size: the position tables are resampled; a UniformGrid's weights are a Quadformer's; as starting weights,
a classifier of other classes is replaced and position tables the model lacks or has no use for are left out), and
otherwise fail with an error naming what differs, not torch's list of size mismatches. Each case goes through every
way weights are loaded: strictly (``load_weights``, ``evaluate --checkpoint``, ``load_state_dict``), through timm's
``checkpoint_path=``, and as starting weights (``create_model(pretrained_file=...)``, ``--pretrained-file``)."""
import json
import re
import warnings

import numpy as np
import pytest
import timm
import torch

from mixres.apps import evaluate, train
from mixres.checkpoints import explain_mismatch, read_state_dict, read_torch_file
from mixres.models import UniformGrid, create_model, load_weights

NAME = "quadformer_vit_tiny_patch16_224"
BASE = dict(img_size=64, n_patches=7, num_classes=4, embed_dim=32, depth=1, num_heads=2)


def quadformer(seed=0, **changes):
    """A tiny Quadformer of BASE with ``changes``, every weight random (timm starts some at zero or constants)."""
    torch.manual_seed(seed)
    model = create_model(NAME, **{**BASE, **changes})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    return model


OK = None
# (the saved model's changes to BASE, the loading model's, what a strict load does, what loading as starting weights
# does): None loads every weight of the same shape; ("warns", pattern) loads with a warning; ("fails", pattern)
# raises a RuntimeError whose message matches. timm's checkpoint_path= loads strictly.
CASES = {
    "the same configuration": ({}, {}, OK, OK),
    "another image size, resample": ({}, dict(img_size=128), OK, OK),
    "another image size, xy-learned": (dict(pos_embed="xy-learned"), dict(pos_embed="xy-learned", img_size=128),
                                       OK, OK),
    "another min_patch_size, xy-learned": (dict(pos_embed="xy-learned"),
                                           dict(pos_embed="xy-learned", min_patch_size=32, n_patches=4), OK, OK),
    "resample into xy": ({}, dict(pos_embed="xy"), OK, OK),
    "xy into resample": (dict(pos_embed="xy"), {}, ("fails", r"no position table for the patches.*pos_embed"),
                         ("fails", r"no position table for the patches.*pos_embed")),
    "xy-learned into resample": (dict(pos_embed="xy-learned"), {}, ("fails", "no position table for the patches"),
                                 ("fails", "no position table for the patches")),
    "xy-learned into xy": (dict(pos_embed="xy-learned"), dict(pos_embed="xy"),
                           ("fails", r"another configuration \(pos_embed: the weights have learned xy position "
                                     r"tables, which the model does not use\)"),
                           ("warns", r"xy_embed.y_table, xy_embed.x_table not used \(the model has pos_embed='xy'\)")),
    "resample into xy-learned": ({}, dict(pos_embed="xy-learned"),
                                 ("fails", r"pos_embed: the model's 'xy-learned' needs learned xy position tables, "
                                           r"which the weights lack"),
                                 ("warns", "xy_embed.y_table, xy_embed.x_table left at their random initialisation")),
    "other classes": ({}, dict(num_classes=10), ("fails", r"num_classes: 4 in the weights, 10 in the model"),
                      ("warns", "vit.head.weight, vit.head.bias left at their random initialisation")),
    "another width": ({}, dict(embed_dim=64), ("fails", "embed_dim: 32 in the weights, 64 in the model"),
                      ("fails", "embed_dim: 32 in the weights, 64 in the model")),
    "another depth": ({}, dict(depth=2), ("fails", "depth: 1 block in the weights, 2 in the model"),
                      ("fails", "depth: 1 block in the weights, 2 in the model")),
    "a uniform grid's": ("uniform grid", {}, OK, OK),
}


def load(route, changes, path):
    if route == "checkpoint_path":
        return timm.create_model(NAME, checkpoint_path=str(path), **{**BASE, **changes})
    if route == "pretrained_file":
        return create_model(NAME, pretrained_file=path, **{**BASE, **changes})
    model = quadformer(seed=1, **changes)
    load_weights(model, path)
    return model


@pytest.mark.parametrize("route", ["load_weights", "checkpoint_path", "pretrained_file"])
@pytest.mark.parametrize("case", list(CASES))
def test_weights_of_another_configuration_load_where_it_means_something_or_say_what_differs(tmp_path, case, route):
    saved_changes, changes, strict, as_start = CASES[case]
    saved = UniformGrid(quadformer()) if saved_changes == "uniform grid" else quadformer(**saved_changes)
    torch.save({"model": saved.state_dict(), "epoch": 1}, tmp_path / "last.pt")  # as mixres.train saves them
    source = saved.quadformer if isinstance(saved, UniformGrid) else saved
    outcome = as_start if route == "pretrained_file" else strict
    if outcome is not None and outcome[0] == "fails":
        with pytest.raises(RuntimeError, match=outcome[1]) as error:
            load(route, changes, tmp_path / "last.pt")
        assert "size mismatch" not in str(error.value) and "Error(s) in loading" not in str(error.value)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(route, changes, tmp_path / "last.pt")
    if outcome is not None:
        assert any(re.search(outcome[1], str(warning.message)) for warning in caught), [str(w.message) for w in caught]
    adapted = {"vit.pos_embed", "xy_embed.y_table", "xy_embed.x_table"}
    for key, value in model.state_dict().items():
        if key in adapted:
            continue
        if value.shape == source.state_dict()[key].shape:
            assert torch.equal(value, source.state_dict()[key]), key
        else:  # only a new classifier, as starting weights
            assert route == "pretrained_file" and key.startswith("vit.head.")
    if "xy_embed.y_table" in source.state_dict() and model.xy_embed is not None:
        for name in ("y_table", "x_table"):
            old = getattr(source.xy_embed, name).detach().numpy()
            new = getattr(model.xy_embed, name).detach().numpy()
            # The table spans the leaf centres' range whatever its length: linear interpolation along it.
            positions = np.arange(len(new)) * (len(old) - 1) / (len(new) - 1)
            expected = np.stack([np.interp(positions, np.arange(len(old)), old[:, c]) for c in range(old.shape[1])], 1)
            np.testing.assert_allclose(new, expected, rtol=1e-6, atol=1e-6)
    if model.pos_embed_kind == "resample":
        # The class token's entry kept, the patches' resampled to the model's grid.
        table = model.vit.pos_embed
        assert table.shape[1] == 1 + (model.geometry.height // 16) * (model.geometry.width // 16)
        assert torch.equal(table[:, :1], source.vit.pos_embed[:, :1])


def test_the_explanation_names_each_configuration_that_differs():
    saved, model = quadformer().state_dict(), quadformer(num_classes=7, embed_dim=64).state_dict()
    message = explain_mismatch(model, saved)
    assert message.startswith("they are of another configuration (num_classes: 4 in the weights, 7 in the model; "
                               "embed_dim: 32 in the weights, 64 in the model): shapes differ: ")
    differing = [key for key in model if model[key].shape != saved[key].shape]
    assert message.endswith(f" and {len(differing) - 3} more") and len(differing) > 10  # three named, not all
    assert explain_mismatch(saved, dict(saved)) is None
    plain = {"head.weight": torch.zeros(3, 8), "fc.weight": torch.zeros(5, 8)}
    assert "num_classes: 3 in the weights, 4 in the model" in explain_mismatch(
        {"head.weight": torch.zeros(4, 8), "fc.weight": torch.zeros(5, 8)}, plain)


# ------------------------------------------------------------------------------------------- files that are no weights
def broken_files(tmp_path):
    """Files that are no state dict: {name: (path, what the error says)}."""
    good = tmp_path / "good.pt"
    torch.save(quadformer().state_dict(), good)
    data = good.read_bytes()
    files = {"truncated": (data[:len(data) // 2], "truncated or corrupt"), "empty": (b"", "the file is empty"),
             "garbage": (bytes(range(256)) * 8, "not a file written by torch.save"),
             "text": (b"weights = 1\n", "not a file written by torch.save")}
    paths = {}
    for name, (content, reason) in files.items():
        (tmp_path / f"{name}.pth").write_bytes(content)
        paths[name] = (tmp_path / f"{name}.pth", reason)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4)}, tmp_path / "whole.safetensors")
    cut = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(cut[:len(cut) // 2])
    paths["truncated safetensors"] = (tmp_path / "cut.safetensors", "not a complete safetensors file")
    torch.save([1, 2], tmp_path / "list.pth")
    paths["a list"] = (tmp_path / "list.pth", "holds no state dict")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth", _use_new_zipfile_serialization=True)
    paths["a pickled module"] = (tmp_path / "module.pth", "it holds objects other than weights")
    return paths


def test_reading_a_file_that_is_no_state_dict_says_why(tmp_path):
    for name, (path, reason) in broken_files(tmp_path).items():
        with pytest.raises(ValueError, match=re.escape(reason)) as error:
            read_state_dict(path)
        assert str(path) in str(error.value), name
    with pytest.raises(ValueError, match="the file is empty"):
        read_torch_file(tmp_path / "empty.pth")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_torch_file(tmp_path / "missing.pth")


@pytest.mark.parametrize("command, option", [("evaluate", "--checkpoint"), ("evaluate", "--pretrained-file"),
                                             ("train", "--pretrained-file")])
def test_the_commands_refuse_such_files_with_a_usage_error(tmp_path, image_folder_of_four, capsys, command, option):
    model = ["--model", NAME, "--img-size", "64", "--num-classes", "4", "--n-patches", "7", "--model-kwargs",
             json.dumps(dict(embed_dim=32, depth=1, num_heads=2)), "--data", str(image_folder_of_four), "--output",
             str(tmp_path / "out")]
    if command == "evaluate":
        model.remove("--n-patches"), model.remove("7")
    main = evaluate.main if command == "evaluate" else train.main
    for name, (path, reason) in broken_files(tmp_path).items():
        with pytest.raises(SystemExit) as exit_:
            main([*model, option, str(path)])
        assert exit_.value.code == 2, name
        error = capsys.readouterr().err.splitlines()[-1]
        assert str(path) in error and reason in error and "Traceback" not in error, error


def test_evaluating_a_checkpoint_of_another_configuration(tmp_path, image_folder_of_four, capsys):
    torch.save({"model": quadformer(pos_embed="xy-learned").state_dict()}, tmp_path / "best.pt")
    options = ["--model", NAME, "--img-size", "64", "--model-kwargs",
               json.dumps(dict(embed_dim=32, depth=1, num_heads=2)), "--data", str(image_folder_of_four),
               "--checkpoint", str(tmp_path / "best.pt"), "--budgets", "4", "--warmup", "0", "--timed-batches", "1",
               "--workers", "0", "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(options)  # the default pos_embed, resample, needs a table the weights lack
    assert exit_.value.code == 2
    assert "no position table for the patches" in capsys.readouterr().err
    rows = evaluate.main([*options, "--pos-embed", "xy-learned", "--img-size", "128"])  # its tables resampled
    assert rows[0]["image_size"] == "128x128" and rows[0]["n_images"] == 4
    # A uniform-grid baseline's training checkpoint: its Quadformer, of the classes its head has.
    torch.save({"model": UniformGrid(quadformer(num_classes=6)).state_dict(), "epoch": 2}, tmp_path / "grid.pt")
    rows = evaluate.main([*options[:-2], "--output", str(tmp_path / "grid"), "--checkpoint", str(tmp_path / "grid.pt")])
    assert json.loads((tmp_path / "grid" / "budgets.json").read_text())["config"]["num_classes"] == 6


@pytest.fixture
def image_folder_of_four(tmp_path):
    from PIL import Image

    for label in range(4):
        (tmp_path / "images" / f"c{label}").mkdir(parents=True)
        pixels = np.random.default_rng(label).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"c{label}" / "0.png")
    return tmp_path / "images"
