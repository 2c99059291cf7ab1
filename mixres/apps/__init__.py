"""The applications built on the tokenizer and the models, and what they share.

- :mod:`~mixres.apps.cli`: the ``mixres`` command (``python -m mixres``);
- :mod:`~mixres.apps.train`: fine-tuning, on one device or under ``torchrun`` (``python -m mixres.train``);
- :mod:`~mixres.apps.evaluate`: budget sweeps against the uniform grid (``python -m mixres.evaluate``);
- :mod:`~mixres.apps.demo`: mosaics and throughput on scikit-image's photos (``python -m mixres.demo``);
- their support: :mod:`~mixres.apps.options` (command-line options), :mod:`~mixres.apps.timing` (wall-clock
  timing), :mod:`~mixres.apps.loaders` (datasets and DataLoaders for training and evaluation).

The ``python -m`` commands keep their names: ``mixres/{train,evaluate,demo,cli}.py`` are their stable entry points.
"""
