"""Procedural shapes: a dataset, a trained tiny SD3 model, and an exact compositional evaluator.

- :mod:`taca_probe.shapes.dataset`: 64x64 images of one or two coloured circles / squares /
  triangles with captions, generated on the fly from a seed, and the held-out prompt split;
- :mod:`taca_probe.shapes.train`: ``python -m taca_probe.shapes.train --out DIR`` trains the
  ``shapes`` model (a real ``StableDiffusion3Pipeline``) whose weights ship in ``weights/``;
- :mod:`taca_probe.shapes.evaluator`: detects every object's colour, shape and position by image
  analysis and scores colour, shape, colour-shape binding and spatial relation;
- :mod:`taca_probe.shapes.benchmark`: held-out prompts x seeds under TACA schedules
  (``taca-probe eval``).

Submodules are imported on demand (the dataset and evaluator need only numpy and scipy).
"""
