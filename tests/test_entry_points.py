"""The stable entry points of the applications, which live in mixres.apps: ``python -m mixres.train`` (torchrun's
``-m mixres.train`` in tests/test_train.py), ``python -m mixres.evaluate``, ``python -m mixres.demo``,
``python -m mixres`` and the console script's ``mixres.cli:main`` run their commands, and importing a command's old
module gives the module that holds its code, not a copy of some of its names."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import HANG_TIMEOUT

ROOT = Path(__file__).parents[1]
MOVED = {"mixres.train": "mixres.apps.train", "mixres.evaluate": "mixres.apps.evaluate",
         "mixres.demo": "mixres.apps.demo", "mixres.cli": "mixres.apps.cli"}
# What pyproject.toml's console script runs.
CONSOLE_SCRIPT = "import sys; from mixres.cli import main; sys.exit(main())"


@pytest.mark.parametrize("old, new", MOVED.items())
def test_a_commands_old_module_is_its_code(old, new):
    code = importlib.import_module(new)
    assert importlib.import_module(old) is code
    package, _, name = old.rpartition(".")
    assert getattr(importlib.import_module(package), name) is code


@pytest.mark.parametrize("command, prog", [
    (["-m", "mixres.train"], "python -m mixres.train"),
    (["-m", "mixres.evaluate"], "python -m mixres.evaluate"),
    (["-m", "mixres.demo"], "python -m mixres.demo"),
    (["-m", "mixres"], "mixres"),
    (["-c", CONSOLE_SCRIPT], "mixres"),
])
def test_each_entry_point_runs_its_command(command, prog):
    done = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=HANG_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {prog} "), done.stdout[:200]
