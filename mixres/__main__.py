"""``python -m mixres``: the ``mixres`` command (:mod:`mixres.cli`)."""
from .cli import main

raise SystemExit(main())
