"""mixres.train's CUDA-only paths: fp16 autocast with its gradient scaler, and DDP over NCCL (two GPUs), on the
tiny Quadformer and colour images of tests/test_train.py. Skipped without the devices they need."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from mixres.apps import train
from mixres.apps.loaders import build_dataset, build_loader
from mixres.apps.model_builder import build_model
from mixres.apps.train import run as train_run

import test_train
from helpers import HANG_TIMEOUT
from test_train import ROOT, TINY, read_log

colours = test_train.colours  # the fixture: 64 px images of 4 colours, 40 to train on and 19 to validate

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fp16_autocast_trains_through_the_gradient_scaler(colours, tmp_path, monkeypatch):
    head_outputs, scaler_updates, initial = set(), [], {}

    def build_and_watch(*args, **kwargs):
        model = build_model(*args, **kwargs)
        initial.update({name: value.detach().clone() for name, value in model.named_parameters()})
        model.vit.head.register_forward_hook(
            lambda module, inputs, output: head_outputs.add((module.training, output.dtype)))
        return model

    update = torch.amp.GradScaler.update

    def update_and_watch(scaler, *args, **kwargs):
        scaler_updates.append((scaler.is_enabled(), scaler.get_scale()))
        return update(scaler, *args, **kwargs)

    monkeypatch.setattr(train_run, "build_model", build_and_watch)
    monkeypatch.setattr(torch.amp.GradScaler, "update", update_and_watch)
    # Two epochs of 5 steps: a step whose scaled gradients overflow is skipped and halves the scale, so some steps
    # must be left to move the weights. --grad-clip takes the path that unscales the gradients first.
    result = train.main([*TINY, "--data", str(colours), "--output", str(tmp_path), "--device", "cuda",
                         "--epochs", "2", "--amp", "fp16", "--grad-clip", "1.0"])

    assert math.isfinite(result["train_loss"]) and math.isfinite(result["val_loss"])
    # The forward ran in float16 under autocast, in training and in evaluation.
    assert head_outputs == {(True, torch.float16), (False, torch.float16)}
    # Every step went through the enabled scaler, which the checkpoint keeps for a resumed run.
    assert len(scaler_updates) == 2 * 5 and all(enabled for enabled, _ in scaler_updates)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["args"]["amp"] == "fp16" and last["scaler"]["scale"] > 0
    # The weights stay float32 (autocast computes in float16, the optimiser updates float32 weights), and every
    # parameter has moved.
    for name, value in initial.items():
        trained = last["model"][name]
        assert trained.dtype == torch.float32, name
        assert not torch.equal(trained.cpu(), value.cpu()), name
    assert [row["epoch"] for row in read_log(tmp_path)] == [1, 2]


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="DDP over NCCL takes one GPU per process, and two processes: two GPUs (NCCL does not run "
                           "two ranks on one GPU)")
def test_ddp_over_nccl_on_two_gpus_keeps_replicas_identical_and_matches_one_process(colours, tmp_path):
    options = ["--epochs", "1", "--pos-embed", "xy-learned", "--no-augment", "--data", str(colours),
               "--device", "cuda"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mixres.train", *TINY, *options, "--batch-size", "4", "--output", str(tmp_path / "ddp")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on 2 x cuda" in done.stdout  # each process on the GPU of its LOCAL_RANK, in an NCCL group
    assert "identical on all 2 processes" in done.stdout  # every process's weights hashed alike
    (row,) = read_log(tmp_path / "ddp")
    assert row["epoch"] == 1

    # One process with the global batch (8) reads the same images per step. The training differs only in the order
    # of float32 sums (DDP's mean of two half-batch means; cuBLAS picks its kernels by shape): the CPU test holds
    # the losses to 1e-5, and 1e-4 leaves room for the GPU's kernels.
    single = train.main([*TINY, *options, "--batch-size", "8", "--output", str(tmp_path / "single")])
    assert row["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)

    # Validation over shards of 10 and 9 images, summed over NCCL, counts each of the 19 once: the DDP row is the
    # single-process evaluation of the DDP weights.
    args = train.parse_args([*TINY, *options])
    model = build_model(args, num_classes=4)
    model.load_state_dict(torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["model"])
    device = torch.device("cuda")
    val = build_dataset(colours, "val", 64, (0.5,) * 3, (0.5,) * 3, train=False)
    metrics = train.validate(model.to(device), build_loader(val, 8, train=False), device)
    assert metrics["val_top1"] == pytest.approx(row["val_top1"])
    assert metrics["val_loss"] == pytest.approx(row["val_loss"], rel=1e-4)
