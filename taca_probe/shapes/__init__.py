"""Procedural shapes: a dataset (:mod:`.dataset`), a tiny SD3 model trained on it (:mod:`.train`, weights in
``weights/``), an exact compositional evaluator (:mod:`.evaluator`) and the held-out prompts x seeds benchmark
of ``taca-probe eval`` (:mod:`.benchmark`). Submodules are imported on demand (the dataset and evaluator need
only numpy and scipy).
"""
