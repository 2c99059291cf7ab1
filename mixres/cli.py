"""The stable entry point of the ``mixres`` command (the console script runs ``mixres.cli:main``, and scripts
installed before the move import it), whose code is :mod:`mixres.apps.cli`. Imported, ``mixres.cli`` is that module
itself."""
import sys

from .apps import cli

sys.modules[__name__] = cli
