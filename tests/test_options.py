"""Every numeric option of every command (mixres mosaic, bench, budgets; python -m mixres.train, mixres.evaluate,
mixres.demo) against numbers out of its range, NaN, infinities, huge and malformed values: each is a usage error
(exit status 2) that names the option and its range, raised before any work. The options are read from the parsers
themselves and must match the ranges written here, so that a new option cannot go unchecked."""
import argparse
import functools
import math
import os
import re

import pytest

from mixres.apps import cli, demo, evaluate, train
from mixres.apps.options import Integer, Real
from mixres.apps.train import options as train_options
from mixres.apps.train import run as train_run

INT64 = 2**63 - 1
SIDE = 2**31 - 1
SEED = 2**63 - 1
WORKERS = max(16, 4 * len(os.sched_getaffinity(0)))

# command -> option -> (kind, lowest valid, highest valid, lowest included). "list": comma-separated integers.
RANGES = {
    "mixres mosaic": {"--n-patches": ("int", 1, INT64), "--min": ("int", 1, SIDE), "--max": ("int", 1, SIDE),
                      "--size": ("int", 1, SIDE), "--batch": ("int", 1, INT64)},
    "mixres bench": {"--batch": ("int", 1, INT64), "--size": ("int", 1, SIDE), "--width": ("int", 1, SIDE),
                     "--n-patches": ("int", 1, INT64), "--min": ("int", 1, SIDE), "--max": ("int", 1, SIDE),
                     "--repeats": ("int", 1, INT64)},
    "mixres budgets": {"--size": ("int", 1, SIDE), "--width": ("int", 1, SIDE), "--min": ("int", 1, SIDE),
                       "--max": ("int", 1, SIDE), "--mean-tokens": ("float", 1, math.inf),
                       "--calibration-images": ("int", 1, INT64), "--n-patches": ("int", 1, INT64),
                       "--batch": ("int", 1, INT64), "--seed": ("int", 0, SEED)},
    "python -m mixres.train": {
        "--num-classes": ("int", 1, INT64), "--img-size": ("int", 1, SIDE), "--n-patches": ("int", 1, INT64),
        "--min-patch-size": ("int", 1, SIDE), "--max-patch-size": ("int", 1, SIDE),
        "--train-length": ("int", 1, INT64), "--val-length": ("int", 1, INT64), "--workers": ("int", 0, WORKERS),
        "--epochs": ("int", 1, INT64), "--batch-size": ("int", 1, INT64), "--lr": ("float", 0, 1, False),
        "--min-lr": ("float", 0, 1), "--weight-decay": ("float", 0, math.inf),
        "--warmup-epochs": ("float", 0, math.inf), "--grad-clip": ("float", 0, math.inf, False),
        "--seed": ("int", 0, SEED), "--mean-tokens": ("float", 1, math.inf), "--calibration-images": ("int", 1, INT64)},
    "python -m mixres.evaluate": {
        "--num-classes": ("int", 1, INT64), "--img-size": ("int", 1, SIDE), "--min-patch-size": ("int", 1, SIDE),
        "--max-patch-size": ("int", 1, SIDE), "--val-length": ("int", 1, INT64), "--batch-size": ("int", 1, INT64),
        "--limit": ("int", 1, INT64), "--workers": ("int", 0, WORKERS), "--budgets": ("list", 1, INT64),
        "--warmup": ("int", 0, INT64), "--timed-batches": ("int", 1, INT64), "--seed": ("int", 0, SEED),
        "--n-patches": ("int", 1, INT64), "--mean-tokens": ("float", 1, math.inf),
        "--calibration-images": ("int", 1, INT64)},
    "python -m mixres.demo": {"--n-patches": ("int", 1, INT64), "--batch": ("int", 1, 4096),
                              "--repeats": ("int", 1, INT64)},
}
# What each command needs besides the option under test, to get as far as checking it.
REQUIRED = {"mixres mosaic": ["photo.png"], "mixres budgets": ["--size", "64"],
            "python -m mixres.train": ["--model", "quadformer_vit_tiny_patch16_224", "--data", "nowhere"],
            "python -m mixres.evaluate": ["--model", "vit_tiny_patch16_224", "--data", "nowhere"]}


@functools.cache
def parsers() -> dict[str, argparse.ArgumentParser]:
    commands = next(action for action in cli.build_parser()._actions
                    if isinstance(action, argparse._SubParsersAction)).choices
    return {**{f"mixres {name}": parser for name, parser in commands.items()},
            "python -m mixres.train": train.build_parser(), "python -m mixres.evaluate": evaluate.build_parser(),
            "python -m mixres.demo": demo.build_parser()}


def test_every_numeric_option_declares_its_range():
    for command, parser in parsers().items():
        plain = [action.option_strings for action in parser._actions if action.type in (int, float)]
        assert not plain, f"{command}: {plain} take any int or float: give them a range " \
                          f"(mixres.apps.options.Integer...)"
        numeric = {action.option_strings[-1]: action.type for action in parser._actions
                   if isinstance(action.type, (Integer, Real))}
        assert set(numeric) == set(RANGES[command]), f"{command}: update RANGES with its options"
        for option, (kind, lowest, highest, *inclusive) in RANGES[command].items():
            parse = numeric[option]
            included = inclusive != [False]
            accepted = [lowest] if included else []
            accepted += [highest] if math.isfinite(highest) else [1e300]
            for value in accepted:
                text = str(value) if kind != "list" else f"{lowest},{highest}"
                assert parse(text) == (value if kind != "list" else [lowest, highest]), (command, option, text)
            if not included:
                with pytest.raises(argparse.ArgumentTypeError):
                    parse(str(lowest))


def bad_values(kind: str, lowest, highest, inclusive=True) -> list[str]:
    """Values outside the range, NaN, infinities, huge and malformed ones."""
    values = ["nan", "inf", "-inf", "NaN", "abc", "", " ", "1e999", "0x10"]
    if kind == "float":
        values += [repr(lowest - 1), "-1e30", repr(-math.inf)]
        values += [repr(lowest)] if not inclusive else []
        values += [repr(highest * 2), "1e30"] if math.isfinite(highest) else []
    else:
        values += [str(lowest - 1), str(highest + 1), str(2**63), str(10**30), str(-2**63 - 1), "1.5", "1e3",
                   "9" * 5000]
    if kind == "list":
        values += ["1,,2", "1,", ",", f"{lowest},{lowest - 1}", f"{highest},{highest + 1}", "1,nan", "1;2"]
    return values


CASES = [(command, option, value) for command, options in RANGES.items() for option, (kind, *bounds) in options.items()
         for value in bad_values(kind, *bounds)]


@pytest.mark.parametrize("command, option, value", CASES)
def test_out_of_range_values_are_usage_errors(command, option, value, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    for module, name in ((cli, "_mosaic"), (cli, "_bench"), (cli, "_budgets"), (train_run, "build_dataset"),
                         (train_options, "check_model_options"), (evaluate, "build_model"), (demo, "load_photo")):
        monkeypatch.setattr(module, name, no_work)
    argv = [*REQUIRED.get(command, []), f"{option}={value}"]  # "=": a value such as -1 is not taken for an option
    with pytest.raises(SystemExit) as exit_:
        if command.startswith("mixres "):
            raise SystemExit(cli.main([command.split()[1], *argv]))
        {"python -m mixres.train": train.parse_args, "python -m mixres.evaluate": evaluate.main,
         "python -m mixres.demo": demo.main}[command](argv)
    errors = capsys.readouterr().err
    assert exit_.value.code == 2, errors
    last = errors.strip().splitlines()[-1]
    assert last.startswith(f"{command}: error: argument {option}") or \
        last.startswith(f"{command}: error: argument -n/{option}"), last
    assert re.search(r"expected (an integer from|comma-separated integers .* each from|a finite number)", last), last


@pytest.mark.parametrize("options, message", [
    (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr 0.001 must be at most --lr 0.0001"),
    (["--lr", "0.5", "--weight-decay", "2"], "--weight-decay 2 times --lr 0.5 must be below 1"),
    (["--weight-decay", "1e30"], "--weight-decay 1e+30 times --lr 0.0001 must be below 1"),
    (["--epochs", "2", "--warmup-epochs", "2.5"], "--warmup-epochs 2.5 must be at most --epochs 2"),
])
def test_training_options_that_contradict_each_other(options, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args([*REQUIRED["python -m mixres.train"], *options])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_limits_themselves_are_accepted():
    args = train.parse_args([*REQUIRED["python -m mixres.train"], "--lr", "1", "--min-lr", "1", "--weight-decay", "0",
                             "--warmup-epochs", "10", "--epochs", "10", "--seed", str(SEED), "--workers", "0",
                             "--grad-clip", "1e300", "--batch-size", str(INT64)])
    assert (args.lr, args.min_lr, args.seed, args.batch_size) == (1, 1, SEED, INT64)


THRESHOLD_COMMANDS = {"mixres mosaic": cli.main, "python -m mixres.train": train.parse_args,
                      "python -m mixres.evaluate": evaluate.main}


@pytest.mark.parametrize("command", THRESHOLD_COMMANDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "abc", "", "64=", "=0.1", "64=nan", "64=0.1,64=0.2",
                                   "0=0.1", "-32=0.1", "64:0.1", "1e999"])
def test_a_threshold_that_is_no_finite_number_per_size_is_a_usage_error(command, value, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_mosaic", lambda *args: pytest.fail("work started before the options were checked"))
    monkeypatch.setattr(evaluate, "build_model", lambda *args: pytest.fail("work started"))
    argv = [*REQUIRED.get(command, []), f"--threshold={value}"]
    with pytest.raises(SystemExit) as exit_:
        if command.startswith("mixres "):
            raise SystemExit(cli.main([command.split()[1], *argv]))
        THRESHOLD_COMMANDS[command](argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"{command}: error: argument --threshold: expected a finite number (0.05), or one per patch size "
        f"(64=0.05,32=0.02), got {value!r}")


def test_thresholds_parse_to_a_number_or_one_per_size():
    from mixres.apps.options import Threshold, format_threshold

    parse = Threshold()
    assert parse("0.05") == 0.05 and parse("-1e-3") == -1e-3
    assert parse("64=0.05,32=0.02") == {64: 0.05, 32: 0.02} and list(parse("32=1,64=2")) == [32, 64]
    for threshold in (0.1 + 0.2, {64: 1 / 3, 32: 2e-7}):
        assert parse(format_threshold(threshold)) == threshold  # every digit kept
