"""The suite's hypothesis setting (tests/hypothesis_seed.py): loaded before the test modules, applied to every
hypothesis test, and printed at both ends of the run, so that the seed of a randomized run is never lost."""
import hypothesis_seed


def pytest_collection_modifyitems(items):
    for item in items:
        function = getattr(item, "function", None)
        if getattr(function, "is_hypothesis_test", False):
            hypothesis_seed.seeded(function)


def pytest_report_header():
    return hypothesis_seed.describe()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(hypothesis_seed.describe())
