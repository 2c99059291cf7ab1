"""The stable entry point ``python -m mixres.train`` (and ``torchrun -m mixres.train``) of fine-tuning, whose
code is the package :mod:`mixres.apps.train`. ``import mixres.train`` gives that package itself."""
import sys

from .apps import train

if __name__ == "__main__":
    train.main()
else:  # the module itself, not a copy of its names: a patch of one reaches the code
    sys.modules[__name__] = train
