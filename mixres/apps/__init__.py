"""The applications built on the tokenizer and the models, and what they share.

- :mod:`~mixres.apps.cli`: the ``mixres`` command (``python -m mixres``);
- :mod:`~mixres.apps.train`: fine-tuning, on one device or under ``torchrun`` (``python -m mixres.train``);
- :mod:`~mixres.apps.evaluate`: budget sweeps against the uniform grid (``python -m mixres.evaluate``);
- :mod:`~mixres.apps.demo`: mosaics and throughput on scikit-image's photos (``python -m mixres.demo``);
- their support: :mod:`~mixres.apps.options` (the command-line options they share),
  :mod:`~mixres.apps.model_builder` (the model that train's and evaluate's options describe),
  :mod:`~mixres.apps.loaders` (datasets and DataLoaders for training and evaluation), :mod:`~mixres.apps.timing`
  (wall-clock timing), :mod:`~mixres.apps.end_to_end` (a ViT against the Quadformer around it, for ``mixres bench
  --end-to-end`` and the benchmarks), :mod:`~mixres.apps.fitting` (images and budgets fitted to a quadtree) and
  :mod:`~mixres.apps.mosaic_files` (a mosaic's PNG and JSON), the last two for ``mixres mosaic`` and the demo.

The ``python -m`` commands keep their names: ``mixres/{train,evaluate,demo,cli}.py`` are their stable entry points.
"""
