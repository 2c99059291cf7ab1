"""The stable entry point ``python -m mixres.demo`` of the demo, whose code is :mod:`mixres.apps.demo`.
``import mixres.demo`` gives that module itself."""
import sys

from .apps import demo

if __name__ == "__main__":
    demo.main()
else:  # the module itself, not a copy of its names: a patch of one reaches the code
    sys.modules[__name__] = demo
