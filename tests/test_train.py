"""mixres.train: a tiny Quadformer fine-tuned in-process and under torchrun (DDP with Gloo on the CPU) on an image
folder of colour classes. It learns; its checkpoints and log rows; a resumed run computes what an uninterrupted one
does; DDP replicas stay identical and match one process with the global batch; validation counts every image once;
pretrained files; and the usage errors."""
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mixres.apps import train
from mixres.apps.loaders import MAX_SEED, ShardSampler, build_dataset, build_loader
from mixres.apps.model_builder import build_model
from mixres.apps.train import loop as train_loop

from helpers import HANG_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
VIT = dict(depth=1, embed_dim=32, num_heads=2)
# A 64 px Quadformer of one block: 16-32 px leaves, 7 of the 4 + 3k reachable budgets (4 to 16).
TINY = ["--model", "quadformer_vit_tiny_patch16_224", "--img-size", "64", "--model-kwargs", json.dumps(VIT),
        "--n-patches", "7", "--batch-size", "8", "--lr", "1e-3", "--warmup-epochs", "0.5", "--workers", "0"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """train/: 10 noisy 64x64 PNGs per colour; val/: 5, 5, 5 and 4 (19 images: DDP shards of 10 and 9)."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, counts in (("train", (10, 10, 10, 10)), ("val", (5, 5, 5, 4))):
        for (name, colour), count in zip(COLOURS.items(), counts):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def run(data, output, *options):
    return train.main([*TINY, "--data", str(data), "--output", str(output), *options])


def scheduled_lr(step, steps_per_epoch, epochs, warmup_epochs=0.5, peak=1e-3, low=0.0):
    """The schedule the module documents, written out: a linear warmup over round(warmup_epochs * steps_per_epoch)
    steps to the peak, then half a cosine down to ``low`` at the run's last step."""
    warmup, total = round(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch
    if step < warmup:
        return peak * (step + 1) / warmup
    return low + (peak - low) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


@pytest.fixture
def optimizer_steps():
    """The learning rate and the weight decays of every optimiser step taken while the test runs."""
    steps = []

    def record(optimizer, args, kwargs):
        decays = sorted(group["weight_decay"] for group in optimizer.param_groups)
        steps.append((optimizer.param_groups[0]["lr"], decays))

    handle = register_optimizer_step_pre_hook(record)
    yield steps
    handle.remove()


@pytest.fixture(scope="module")
def one_epoch(colours, tmp_path_factory):
    """The last.pt of a run of one epoch (TINY: 5 steps of 8 images)."""
    output = tmp_path_factory.mktemp("one_epoch")
    run(colours, output, "--epochs", "1")
    return output / "last.pt"


def read_log(output, strings=()):
    """The rows of log.jsonl, checked to be those of log.csv (numbers, but the columns named in ``strings``)."""
    rows = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    with open(output / "log.csv", newline="") as file:
        csv_rows = list(csv.DictReader(file))
    assert [{key: value if key in strings else float(value) for key, value in row.items()} for row in csv_rows] == rows
    return rows


# ------------------------------------------------------------------------------------------ one process
def test_a_tiny_quadformer_learns_colours_and_writes_checkpoints_and_logs(colours, tmp_path):
    result = run(colours, tmp_path, "--epochs", "2")
    rows = read_log(tmp_path)
    assert [row["epoch"] for row in rows] == [1, 2]
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "val_loss", "val_top1", "images_per_s", "seconds"]
    assert rows[1]["train_loss"] < rows[0]["train_loss"] and rows[1]["val_loss"] < rows[0]["val_loss"]
    assert rows[1]["val_top1"] >= 50  # chance is 25
    assert rows[1]["lr"] < rows[0]["lr"] <= 1e-3  # after the warmup, the cosine decays
    assert {key: result[key] for key in rows[1]} == rows[1]
    assert result["best_val_top1"] == max(row["val_top1"] for row in rows)

    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best_top1", "metrics", "args"} <= set(last)
    assert last["epoch"] == 2 and last["args"]["model"] == "quadformer_vit_tiny_patch16_224"
    assert last["scheduler"]["last_epoch"] == 2 * 5  # stepped per iteration: 40 images in batches of 8
    assert all(not key.startswith("module.") for key in last["model"])  # saved unwrapped
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["metrics"]["val_top1"] == result["best_val_top1"]


def test_a_resumed_run_computes_what_an_uninterrupted_one_does(colours, tmp_path, monkeypatch):
    straight = run(colours, tmp_path / "straight", "--epochs", "2")

    class Interrupted(Exception):
        pass

    save = train_loop.save_checkpoint

    def save_then_die(path, state):
        save(path, state)
        raise Interrupted

    monkeypatch.setattr(train_loop, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):  # the first epoch's last.pt is written, then the run dies
        run(colours, tmp_path / "resumed", "--epochs", "2", "--resume", "auto")  # auto: nothing yet, from scratch
    monkeypatch.setattr(train_loop, "save_checkpoint", save)
    resumed = run(colours, tmp_path / "resumed", "--epochs", "2", "--resume", "auto")

    # The same batches in the same order, the same per-epoch seeds, and the optimizer, scheduler and weights
    # restored bit for bit: the same floating-point operations, so the same bits.
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    assert a["scheduler"] == b["scheduler"] and resumed["weights_sha256"] == straight["weights_sha256"]
    timing = ("images_per_s", "seconds")
    strip = lambda row: {key: value for key, value in row.items() if key not in timing}  # noqa: E731
    assert [strip(row) for row in read_log(tmp_path / "resumed")] == [strip(row)
                                                                        for row in read_log(tmp_path / "straight")]


# --------------------------------------------------------------------------------- resuming with other options
def test_resuming_with_a_larger_batch_continues_the_schedule_where_its_epochs_end(colours, tmp_path, capsys,
                                                                                   optimizer_steps):
    run(colours, tmp_path, "--epochs", "1", "--batch-size", "4")  # 10 steps: the checkpoint's schedule is at 10
    optimizer_steps.clear()
    capsys.readouterr()
    run(colours, tmp_path, "--epochs", "2", "--batch-size", "8", "--resume", "auto")  # 5 steps per epoch now
    # An uninterrupted run of 8 images per step: 10 steps, 2 of warmup. The resumed epoch is its steps 5 to 9 (the
    # checkpoint's step count, 10, is this run's end: lr 0 throughout).
    lrs = [lr for lr, _ in optimizer_steps]
    assert lrs == pytest.approx([scheduled_lr(step, 5, 2) for step in range(5, 10)], rel=1e-12)
    assert lrs[0] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 3 / 8)) / 2) and min(lrs) > 0
    printed = capsys.readouterr().out
    assert "rescheduled: the checkpoint's run took 4 x 1 images per step" in printed
    assert "takes 8 x 1 in 5 steps per epoch, so its schedule continues at step 5 of 10" in printed
    assert read_log(tmp_path)[1]["lr"] == lrs[-1]


def test_a_resumed_run_follows_its_own_lr_epochs_warmup_and_weight_decay(colours, one_epoch, tmp_path,
                                                                          optimizer_steps):
    (tmp_path / "out").mkdir()
    resumed = tmp_path / "out" / "last.pt"
    resumed.write_bytes(one_epoch.read_bytes())
    run(colours, tmp_path / "out", "--epochs", "3", "--lr", "2e-3", "--min-lr", "1e-4", "--warmup-epochs", "1.2",
        "--weight-decay", "0.2", "--resume", "auto")
    # As if the whole run had had these options: 15 steps, 6 of warmup; the resumed steps are 5 to 14.
    assert [lr for lr, _ in optimizer_steps] == pytest.approx(
        [scheduled_lr(step, 5, 3, warmup_epochs=1.2, peak=2e-3, low=1e-4) for step in range(5, 15)], rel=1e-12)
    assert all(decays == [0.0, 0.2] for _, decays in optimizer_steps)  # 1-D parameters and tables undecayed
    assert torch.load(resumed, weights_only=True)["epoch"] == 3


def test_resuming_a_finished_run_says_there_is_nothing_to_train(colours, one_epoch, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "last.pt").write_bytes(one_epoch.read_bytes())
    result = run(colours, tmp_path / "out", "--epochs", "1", "--resume", "auto")
    assert "nothing to train: the checkpoint has done 1 epochs, and --epochs is 1" in capsys.readouterr().out
    assert result["epoch"] == 1 and not (tmp_path / "out" / "log.jsonl").exists()  # no epoch ran


@pytest.mark.parametrize("options, message", [
    (["--pos-embed", "xy"], "--pos-embed is not given in the checkpoint and xy in this run"),
    (["--img-size", "128", "--n-patches", "16"], "--img-size is 64 in the checkpoint and 128 in this run"),
    (["--model-kwargs", json.dumps({**VIT, "depth": 2})],
     '--model-kwargs is {"depth": 1, "embed_dim": 32, "num_heads": 2} in the checkpoint and {"depth": 2, '),
    (["--min-patch-size", "32", "--n-patches", "4"], "--min-patch-size is not given in the checkpoint and 32"),
    (["--max-patch-size", "16", "--n-patches", "16"], "--max-patch-size is not given in the checkpoint and 16"),
    (["--uniform-grid"], "--uniform-grid is not given in the checkpoint and given in this run"),
    (["--data", "{three_colours}"], r"its weights do not fit this run's quadformer_vit_tiny_patch16_224 \(3 "
                                    r"classes.*num_classes: 4 in the weights, 3 in the model"),
    (["--model", "quadformer_vit_small_patch16_224"], "holds a quadformer_vit_tiny_patch16_224, not a "
                                                      "quadformer_vit_small_patch16_224"),
])
def test_resuming_another_model_is_refused_naming_the_option(colours, one_epoch, tmp_path, capsys, options, message):
    if "{three_colours}" in options:  # the data of another number of classes
        shutil.copytree(colours, tmp_path / "three", ignore=shutil.ignore_patterns("yellow"))
        options = [option.format(three_colours=tmp_path / "three") for option in options]
    with pytest.raises(SystemExit) as exit_:
        run(colours, tmp_path, "--resume", str(one_epoch), *options)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert re.search(message, error), error
    if "--pretrained-file" not in message and "weights do not fit" not in message and "holds a" not in message:
        assert f"start a new run from its weights with --pretrained-file {one_epoch}" in error


@pytest.mark.parametrize("options", [
    ["--model-kwargs", json.dumps({**VIT, "drop_path_rate": 0.1})],  # regularisation only
    ["--n-patches", "10", "--scorer", "entropy"],
    ["--amp"],
    ["--batch-size", "4", "--seed", "3", "--no-augment"],
])
def test_options_that_keep_the_model_may_change_on_resume(colours, one_epoch, tmp_path, options):
    result = run(colours, tmp_path, "--epochs", "1", "--resume", str(one_epoch), *options)  # nothing left to train
    assert result["best_val_top1"] == torch.load(one_epoch, weights_only=True)["best_top1"]


def test_bf16_autocast_and_gradient_clipping_on_the_cpu(colours, tmp_path):
    result = run(colours, tmp_path, "--epochs", "1", "--amp", "--grad-clip", "1.0", "--pos-embed", "xy")
    assert np.isfinite(result["train_loss"]) and np.isfinite(result["val_loss"])
    assert torch.load(tmp_path / "last.pt", weights_only=True)["args"]["amp"] == "bf16"


def test_compile_trains_as_eager_does_in_one_graph_per_mode(colours, tmp_path):
    """--compile (inductor) computes what the eager run does, up to float32 rounding, with no graph break and no
    recompilation: one graph to train (forward and backward) and one to evaluate, over two epochs."""
    from torch._dynamo.utils import counters

    # On the CPU, whatever the machine has. The training images validate too, so that every batch is full (40 in
    # batches of 8): a last, smaller batch would compile a second evaluation graph, of dynamic batch size.
    options = ["--epochs", "2", "--val-split", "train", "--device", "cpu"]
    run(colours, tmp_path / "eager", *options)
    torch._dynamo.reset()
    counters.clear()
    try:
        run(colours, tmp_path / "compiled", *options, "--compile")
        graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert graphs == 2 and not breaks, (graphs, breaks)
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert eager[0]["train_loss"] - eager[1]["train_loss"] > 0.1  # it learns: a run that did not would differ
    # The losses are means of float32 losses (2^-24 relative rounding) that inductor sums in other orders, after
    # AdamW steps that carry those differences on: they differ by a few 1e-8 here. 1e-5 is far below what a lost
    # or wrong step changes: each of the 10 steps lowers the loss by about 0.05 on average.
    for eager_row, compiled_row in zip(eager, compiled, strict=True):
        assert compiled_row["val_top1"] == eager_row["val_top1"]
        for key in ("train_loss", "val_loss"):
            assert compiled_row[key] == pytest.approx(eager_row[key], rel=1e-5), (key, eager_row["epoch"])


# ----------------------------------------------------------------------------------------------- DDP
def test_ddp_on_two_processes_keeps_replicas_identical_and_matches_one_process(colours, tmp_path):
    options = ["--epochs", "1", "--pos-embed", "xy-learned", "--no-augment", "--data", str(colours)]
    per_process = [*TINY, *options, "--batch-size", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mixres.train", *per_process, "--output", str(tmp_path / "ddp")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "identical on all 2 processes" in done.stdout  # every process's weights hashed alike
    assert "Grad strides do not match" not in done.stderr  # DDP's buckets fit every gradient
    assert "find_unused_parameters" not in done.stderr  # every parameter got its gradient in every step
    (row,) = read_log(tmp_path / "ddp")
    assert row["epoch"] == 1 and "on 2 x cpu" in done.stdout

    # One process with the global batch (8) reads the same images per step: the same training, up to the order
    # of floating-point sums (the gradient as the mean of two half-batch means).
    single = train.main([*TINY, *options, "--batch-size", "8", "--output", str(tmp_path / "single")])
    ddp_weights = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["model"]
    single_weights = torch.load(tmp_path / "single" / "last.pt", weights_only=True)["model"]
    assert row["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)

    args = train.parse_args([*TINY, *options])
    model = build_model(args, num_classes=4)
    model.load_state_dict(ddp_weights)
    model.eval()
    val = build_dataset(colours, "val", 64, (0.5,) * 3, (0.5,) * 3, train=False)
    images = torch.stack([val[i][0] for i in range(len(val))])

    # The attention's key bias cannot change what the model computes (adding one number to every logit of a
    # softmax row changes nothing), so its exact gradient is 0 and its float32 gradient is rounding noise (about
    # 1e-11), whose sign and size follow the order of the sums: the CPU's vector width (AVX2 or AVX-512), the
    # thread count, DDP's mean of two half-batch means. AdamW divides every gradient by its own running RMS and
    # turns that noise into steps of a fraction of lr, so the two runs' key biases differ by about 1e-5 on some
    # CPUs (ATEN_CPU_CAPABILITY=default shows it on any x86-64). Check that the key bias is indeed inert (any
    # value computes the same logits), then compare every weight with the DDP run's key bias set to the
    # single-process run's.
    key_bias = slice(VIT["embed_dim"], 2 * VIT["embed_dim"])  # qkv.bias holds the query, key and value biases
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logits = model(images)
        for name, value in model.named_parameters():
            if name.endswith("attn.qkv.bias"):
                value[key_bias] = torch.randn(value[key_bias].shape, generator=generator)
        torch.testing.assert_close(model(images), logits)
    for key, value in single_weights.items():
        ddp_value = ddp_weights[key].clone()
        if key.endswith("attn.qkv.bias"):
            ddp_value[key_bias] = value[key_bias]
        torch.testing.assert_close(ddp_value, value, rtol=1e-4, atol=1e-5, msg=key)

    # Validation over shards of 10 and 9 images counts each of the 19 once: the DDP row is the single-process
    # evaluation of the DDP weights.
    model.load_state_dict(ddp_weights)
    metrics = train.validate(model, build_loader(val, 8, train=False), torch.device("cpu"))
    assert metrics["val_top1"] == pytest.approx(row["val_top1"])
    assert metrics["val_loss"] == pytest.approx(row["val_loss"], rel=1e-5)


def test_resuming_on_two_processes_continues_the_schedule_of_a_run_on_one(colours, one_epoch, tmp_path):
    (tmp_path / "last.pt").write_bytes(one_epoch.read_bytes())  # one process: 5 steps of 8 images
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "mixres.train", *TINY, "--epochs", "2", "--data", str(colours), "--output", str(tmp_path),
               "--resume", "auto"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    # Two processes of 8 images: 2 steps per epoch, 4 in all, 1 of warmup; the resumed epoch is steps 2 and 3 (the
    # checkpoint's step count, 5, is past this run's end: lr 0 throughout).
    assert "rescheduled: the checkpoint's run took 8 x 1 images per step" in done.stdout
    assert "takes 8 x 2 in 2 steps per epoch, so its schedule continues at step 2 of 4" in done.stdout
    first_lr = float(re.search(r"after epoch 1 .*: step 2 of 4, lr (\S+)\n", done.stdout).group(1))
    assert first_lr == pytest.approx(scheduled_lr(2, 2, 2), rel=1e-3) == 7.5e-4  # printed to 4 digits
    assert read_log(tmp_path)[-1]["lr"] == pytest.approx(scheduled_lr(3, 2, 2), rel=1e-12) == 2.5e-4
    assert torch.load(tmp_path / "last.pt", weights_only=True)["world_size"] == 2


def test_evaluation_shards_cover_each_item_once_and_metrics_are_exact():
    for world in (1, 2, 3):
        shards = [list(ShardSampler(range(7), world, rank)) for rank in range(world)]
        assert sorted(sum(shards, [])) == list(range(7)) and [len(s) for s in shards] == [len(range(r, 7, world))
                                                                                        for r in range(world)]
    logits = torch.randn(7, 6, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0])

    class Lookup(nn.Module):  # "images" are item indices, and the logits are given
        def forward(self, index):
            return logits[index]

    loader = torch.utils.data.DataLoader(list(zip(range(7), labels.tolist())), batch_size=3)
    metrics = train.validate(Lookup(), loader, torch.device("cpu"))
    top5 = logits.topk(5, dim=1).indices
    assert metrics["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    assert metrics["val_top1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    assert metrics["val_top5"] == pytest.approx(100 * (top5 == labels[:, None]).any(1).float().mean().item())


# ------------------------------------------------------------------------------------------- pretrained
@pytest.mark.parametrize("num_classes", [4, 10])
def test_a_plain_vit_file_starts_a_quadformer_with_a_new_head_where_the_classes_differ(tmp_path, num_classes):
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=4, **VIT)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    args = train.parse_args([*TINY, "--data", "unused", "--pretrained-file", str(tmp_path / "vit.pth")])
    if num_classes == 4:
        model = build_model(args, num_classes=num_classes)
    else:
        with pytest.warns(UserWarning, match="vit.head.weight, vit.head.bias left at their random initialisation"):
            model = build_model(args, num_classes=num_classes)
    for name, value in vit.state_dict().items():
        if name.startswith("head.") and num_classes != 4:
            assert model.vit.state_dict()[name].shape[0] == num_classes
        else:
            assert torch.equal(model.vit.state_dict()[name], value), name


def test_a_quadformer_checkpoint_file_starts_a_quadformer_whole(tmp_path):
    args = train.parse_args([*TINY, "--data", "unused", "--pos-embed", "xy-learned"])
    torch.manual_seed(1)
    source = build_model(args, num_classes=4)
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "last.pt")  # as this script saves them
    args = train.parse_args([*TINY, "--data", "unused", "--pos-embed", "xy-learned",
                             "--pretrained-file", str(tmp_path / "last.pt")])
    model = build_model(args, num_classes=4)
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert model.xy_embed is not None


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("options, message", [
    (["--data", "{tmp}/nowhere"], "no such folder"),
    (["--data", "{colours}", "--n-patches", "8"], "n_patches=8 is unreachable .* nearest valid: 7 or 10"),
    (["--data", "{colours}", "--resume", "{tmp}/missing.pt"], "no such checkpoint"),
    (["--data", "{colours}", "--pretrained-file", "{tmp}/missing.pth"], "no such file"),
    (["--data", "{colours}", "--model", "vit_tiny_patch16_224"], "--n-patches configure a Quadformer"),
    (["--data", "{colours}", "--model", "no_such_model"], "unknown timm model 'no_such_model'"),
    (["--data", "{colours}", "--amp", "fp16", "--device", "cpu"], "fp16 is for CUDA"),
    (["--data", "{colours}", "--model-kwargs", "[1]"], "expected a JSON object"),
    *[(["--data", "{colours}", "--seed", str(seed)],
       rf"argument --seed: expected an integer from 0 to 2\*\*63 - 1, got '{str(seed)[:30]}")  # long values end in ...
      for seed in (-1, -2**63, 2**63, 2**64, 2**200)],
    (["--data", "small-objects", "--skip-bad-images"], "--skip-bad-images: skipping unreadable images is for image "
                                                       "folders: this data has no image files"),
    (["--data", "{colours}", "--threshold", "nan"], r"argument --threshold: expected a finite number \(0.05\), or "
                                                    r"one per patch size \(64=0.05,32=0.02\), got 'nan'"),
    (["--data", "{colours}", "--threshold", "32=0.1,32=0.2"], "argument --threshold: expected a finite number"),
    (["--data", "{colours}", "--threshold", "64=0.1"], r"--threshold: threshold as a dict must have one entry per "
                                                       r"splittable patch size, keys \[64, 32\]"),
    (["--data", "{colours}", "--threshold", "0.1", "--mean-tokens", "10"],
     "argument --mean-tokens: not allowed with argument --threshold"),
    (["--data", "{colours}", "--threshold", "0.1", "--uniform-grid"],
     "--threshold gives each image its own number of tokens, which the uniform grid .* cannot"),
    (["--data", "{colours}", "--mean-tokens", "8"], r"--mean-tokens 8 must be from 1 \(the roots: no image has fewer "
                                                    r"leaves\) to 7 \(the cap, --n-patches\)"),
    (["--data", "{colours}", "--mean-tokens", "0.5"], "argument --mean-tokens: expected a finite number at least 1"),
])
def test_bad_options_exit_with_a_usage_error(colours, tmp_path, capsys, options, message):
    options = [option.format(tmp=tmp_path, colours=colours) for option in options]
    with pytest.raises(SystemExit) as exit_:
        train.main([*TINY, "--output", str(tmp_path / "out"), *options])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("python -m mixres.train: error:")
    assert re.search(message, error), error


@pytest.mark.parametrize("seed", [2**32, MAX_SEED])
def test_seeds_up_to_the_largest_train_and_order_the_data_by_seed_and_epoch(colours, tmp_path, seed):
    train_set = build_dataset(colours, "train", 64, (0.5,) * 3, (0.5,) * 3, train=False)
    orders = []
    for epoch in (0, 1, 2**20):
        loader = build_loader(train_set, 8, train=True, seed=seed)
        loader.sampler.set_epoch(epoch)
        orders.append(list(loader.sampler))
    assert all(sorted(order) == list(range(40)) for order in orders) and orders[0] != orders[1] != orders[2]
    assert list(loader.sampler) == orders[2]  # a function of (seed, epoch)
    if seed == MAX_SEED:  # the whole run: data order, per-epoch seeds, weights, the validation seed + 1
        result = run(colours, tmp_path, "--epochs", "1", "--seed", str(seed))
        assert np.isfinite(result["train_loss"])
        small = build_dataset("small-objects", "val", 64, (0.5,) * 3, (0.5,) * 3, train=False, length=2,
                              seed=seed + 1)  # what train gives generated validation data
        assert small[1][0].shape == (3, 64, 64)
    with pytest.raises(ValueError, match=r"seed must be an int from 0 to 2\*\*63 - 1, got -1"):
        build_loader(train_set, 8, train=True, seed=-1)


# ------------------------------------------------------------------------------------------ unreadable images
def test_skipping_unreadable_images_trains_as_on_the_readable_ones_and_counts_them(colours, one_epoch, tmp_path,
                                                                                    capsys):
    from test_data import BAD_FILES, write_bad

    data = tmp_path / "data"
    shutil.copytree(colours, data)
    bad = {"corrupt": data / "train" / "red" / "bad.png", "truncated": data / "train" / "green" / "bad.png",
           "not an image": data / "train" / "blue" / "bad.png"}
    for kind, path in {**bad, "truncated ": data / "val" / "red" / "bad.png"}.items():
        write_bad(kind.strip(), path)
    capsys.readouterr()
    result = run(data, tmp_path / "out", "--epochs", "1", "--skip-bad-images")
    printed = capsys.readouterr().out
    assert "skipped 3 unreadable training images of 43:\n" in printed
    assert "skipped 1 unreadable validation images of 20:\n" in printed
    for kind, path in bad.items():
        assert f"  cannot read {path}: {BAD_FILES[kind]}" in printed
    assert "training quadformer_vit_tiny_patch16_224 (0.04M parameters) on 1 x cpu, 40 training and 19 " in printed
    (row,) = read_log(tmp_path / "out")
    assert row["train_skipped"] == 3 and row["val_skipped"] == 1
    # The readable files in their order: the same training and validation as a run on the folder without the others.
    clean = torch.load(one_epoch, weights_only=True)
    assert row["val_loss"] == clean["metrics"]["val_loss"] and result["val_top1"] == clean["metrics"]["val_top1"]
    for key, value in torch.load(tmp_path / "out" / "last.pt", weights_only=True)["model"].items():
        assert torch.equal(value, clean["model"][key]), key


def test_an_unreadable_image_stops_training_with_its_name_from_a_worker_too(colours, tmp_path, capsys):
    from test_data import write_bad

    data = tmp_path / "data"
    shutil.copytree(colours, data)
    write_bad("truncated", data / "train" / "yellow" / "bad.png")
    with pytest.raises(SystemExit) as exit_:
        run(data, tmp_path / "out", "--epochs", "1", "--workers", "2")
    assert exit_.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]  # one line: the worker's traceback left out
    bad = data / "train" / "yellow" / "bad.png"
    assert error.startswith(f"python -m mixres.train: error: --data: cannot read {bad}: image file is truncated")
    assert error.endswith("(--skip-bad-images leaves unreadable files out)"), error


def _broken(kind, last_pt, path):
    """Writes at ``path`` a file that is not a whole mixres.train checkpoint, made from the good ``last_pt``."""
    data = last_pt.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:len(data) // 2])  # as a copy or a disk-full write cut short
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    else:
        checkpoint = torch.load(last_pt, weights_only=True)
        if kind == "state dict":
            checkpoint = checkpoint["model"]
        elif kind == "no optimizer":
            del checkpoint["optimizer"]
        elif kind == "a list":
            checkpoint = [1, 2, 3]
        elif kind == "epoch 0":
            checkpoint["epoch"] = 0
        torch.save(checkpoint, path)


@pytest.mark.parametrize("kind, message", [
    ("truncated", "cannot read {path}: truncated or corrupt"),
    ("empty", "cannot read {path}: the file is empty"),
    ("random bytes", "cannot read {path}: not a file written by torch.save"),
    ("state dict", "{path} is not a checkpoint of python -m mixres.train but a state dict of weights alone: start a "
                   "new run from it with --pretrained-file {path}"),
    ("no optimizer", "{path} is not a whole checkpoint of python -m mixres.train: it lacks optimizer"),
    ("a list", "{path} is not a checkpoint of python -m mixres.train: it holds a list"),
    ("epoch 0", "{path} is not a whole checkpoint of python -m mixres.train: its epoch is not what this script "
                "writes"),
])
@pytest.mark.parametrize("how", ["path", "auto"])
def test_resuming_from_a_file_that_is_no_whole_checkpoint_is_a_usage_error(colours, one_epoch, tmp_path, capsys,
                                                                            kind, message, how):
    path = tmp_path / "last.pt"
    _broken(kind, one_epoch, path)
    with pytest.raises(SystemExit) as exit_:
        run(colours, tmp_path, "--resume", str(path) if how == "path" else "auto")
    assert exit_.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(f"python -m mixres.train: error: --resume: {message.format(path=path)}"), error


def test_uniform_grid_baseline_trains_at_the_budgets_grid(tmp_path, capsys):
    from mixres.models import UniformGrid

    args = train.parse_args(["--model", "quadformer_vit_tiny_patch16_224", "--img-size", "128", "--model-kwargs",
                             '{"embed_dim": 32, "depth": 1, "num_heads": 2}', "--n-patches", "28", "--uniform-grid",
                             "--data", str(tmp_path), "--output", str(tmp_path / "out")])
    model = build_model(args, num_classes=3)
    assert isinstance(model, UniformGrid) and model.grid == (5, 5)  # about 28 tokens
    assert model(torch.randn(2, 3, 128, 128)).shape == (2, 3)
    assert model.num_classes == 3 and "quadformer.vit.cls_token" in model.no_weight_decay()
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "vit_tiny_patch16_224", "--uniform-grid", "--data", str(tmp_path)])
    assert "--uniform-grid is the baseline of a Quadformer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ adaptive budgets
@pytest.fixture
def tokenized_lengths(monkeypatch):
    """The lengths of every padded mosaic that a Quadformer tokenizes while the test runs (one tensor a batch)."""
    from mixres.models import Quadformer

    lengths, tokenize = [], Quadformer.tokenize

    def recording(self, images, n_patches=None):
        mosaic = tokenize(self, images, n_patches)
        assert mosaic.is_padded and mosaic.n_patches == self.n_patches  # padded to the cap
        lengths.append(mosaic.lengths.clone())
        return mosaic

    monkeypatch.setattr(Quadformer, "tokenize", recording)
    return lengths


def test_a_threshold_trains_on_padded_mosaics_of_each_images_own_length_and_is_logged(colours, tmp_path,
                                                                                       tokenized_lengths):
    result = run(colours, tmp_path, "--epochs", "1", "--n-patches", "16", "--threshold", "64=0.01,32=0.002")
    lengths = torch.cat(tokenized_lengths)
    assert len(lengths) == 40 + 19  # the training images, then the validation ones
    assert lengths.min() >= 1 and lengths.max() <= 16 and len(lengths.unique()) > 1  # some images stop early
    assert math.isfinite(result["train_loss"]) and result["threshold"] == "64=0.01,32=0.002"
    assert read_log(tmp_path, strings=("threshold",))[0]["threshold"] == "64=0.01,32=0.002"
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["threshold"] == {64: 0.01, 32: 0.002} and last["args"]["calibration"] is None


def test_mean_tokens_calibrates_once_on_the_training_images_and_a_resumed_run_keeps_it(colours, tmp_path, capsys,
                                                                                      tokenized_lengths, monkeypatch):
    from mixres.apps import adaptive

    run(colours, tmp_path, "--epochs", "1", "--n-patches", "16", "--mean-tokens", "10", "--calibration-images", "24")
    out = capsys.readouterr().out
    assert re.search(r"calibrated on the training images: --mean-tokens 10: threshold \S+ .* over 24 images", out)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    record = last["args"]["calibration"]
    assert record["target"] == 10 and record["max_patches"] == 16 and record["sample_images"] == 24
    assert last["threshold"] == record["threshold"] and read_log(tmp_path)[0]["threshold"] == record["threshold"]
    # What the record states holds for the sample, tokenized at the threshold: 24 training images, evenly spaced,
    # through the evaluation transform.
    model = build_model(train.parse_args([*TINY, "--n-patches", "16", "--data", str(colours)]), num_classes=4)
    model.threshold = record["threshold"]
    images = build_dataset(colours, "train", 64, model.input_mean.flatten().tolist(),
                           model.input_std.flatten().tolist(), train=False)
    sample = torch.stack([images[round(i * 39 / 23)][0] for i in range(24)])
    tokenized_lengths.clear()
    model.tokenize(sample)
    (lengths,) = tokenized_lengths
    assert (lengths.double().mean().item(), lengths.min().item(), lengths.max().item()) == \
        (record["mean_tokens"], record["min_tokens"], record["max_tokens"])
    assert abs(record["mean_tokens"] - 10) <= 1.5  # 24 images, each step of the mean is 3 / 24

    def no_calibration(*args, **kwargs):
        raise AssertionError("the resumed run calibrated again")

    monkeypatch.setattr(adaptive, "calibrate_model", no_calibration)
    run(colours, tmp_path, "--epochs", "2", "--n-patches", "16", "--mean-tokens", "10", "--resume", "auto")
    assert "the checkpoint's calibration: threshold" in capsys.readouterr().out
    assert torch.load(tmp_path / "last.pt", weights_only=True)["threshold"] == record["threshold"]


def test_adaptive_budgets_need_a_quadformer(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "vit_tiny_patch16_224", "--mean-tokens", "10", "--data", str(tmp_path)])
    assert "--mean-tokens sets adaptive budgets of a Quadformer: the model must be a quadformer_* one" in \
        capsys.readouterr().err
