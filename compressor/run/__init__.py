"""A run's folder (RUN_DIR): its layout and reading it back, metrics, report.md and the plot.

``run_dir`` owns the layout (config.json, levels, resumption, ``list_levels``/``load_level``, which
rebuild a structured level with ``prune.channels``), ``report`` writes metrics.json and report.md,
``plotting`` draws accuracy against sparsity or MACs. It may import the base modules, ``prune`` and
``train``; never ``export`` or the pipeline.
"""
