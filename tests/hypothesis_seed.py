"""Which examples hypothesis draws: one setting for the whole suite, so that any failure can be replayed.

- By default the examples are derandomized: each test draws the same examples on every run and every machine, so a
  failure (in CI too) reproduces by running the test again. The example database is off, so that no run depends
  on what an earlier run on the same machine found.
- ``MIXRES_HYPOTHESIS_SEED=N`` draws other examples, from seed N; ``MIXRES_HYPOTHESIS_SEED=random`` picks N at
  random. The run prints N (conftest.py); running again with ``MIXRES_HYPOTHESIS_SEED=N`` replays it.

conftest.py imports this module before any test module, and so does a script that runs hypothesis tests in a
subprocess (tests/test_fuzz_ops.py), which then draws from the same seed: a random N is exported to the
environment it inherits.
"""
import os
import random

from hypothesis import seed, settings

VARIABLE = "MIXRES_HYPOTHESIS_SEED"


def _read_seed() -> int | None:
    value = os.environ.get(VARIABLE, "").strip()
    if not value:
        return None
    if value == "random":
        value = str(random.SystemRandom().randrange(2**32))
        os.environ[VARIABLE] = value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{VARIABLE} must be an integer or 'random', got {value!r}") from None


SEED = _read_seed()
# No deadline: a loaded machine must not fail a test for being slow (timing is the benchmarks' business).
settings.register_profile("mixres", derandomize=SEED is None, database=None, deadline=None, print_blob=True)
settings.load_profile("mixres")  # before the tests' own @settings, which inherit what they do not set


def seeded(test):
    """``test``, a hypothesis test, drawing its examples from :data:`SEED` when one is set."""
    return test if SEED is None else seed(SEED)(test)


def describe() -> str:
    if SEED is None:
        return f"hypothesis: derandomized examples ({VARIABLE}=random draws others)"
    return f"hypothesis: examples drawn from seed {SEED} ({VARIABLE}={SEED} replays them)"
