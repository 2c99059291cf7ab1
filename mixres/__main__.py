"""``python -m mixres``: the ``mixres`` command (:mod:`mixres.apps.cli`)."""
from .apps.cli import main

raise SystemExit(main())
