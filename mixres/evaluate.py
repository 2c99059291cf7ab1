"""The stable entry point ``python -m mixres.evaluate`` of the budget sweep, whose code is
:mod:`mixres.apps.evaluate`. ``import mixres.evaluate`` gives that module itself."""
import sys

from .apps import evaluate

if __name__ == "__main__":
    evaluate.main()
else:  # the module itself, not a copy of its names: a patch of one reaches the code
    sys.modules[__name__] = evaluate
