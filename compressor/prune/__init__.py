"""Pruning: which weights or channels go, and how many.

The weights side (``mask``, ``weights``: one global magnitude threshold over every prunable tensor)
and the channels side (``channels``: Torch-Pruning's dependency graph, shrinking a model to a plan;
``allocation``: how many channels each coupled group keeps; ``latency``: the predicted latency of a
plan from a measured table; ``levels``: the structured levels of a run), with the criteria registry
(``criteria/``: a new criterion is one file and one line). It may import the base modules
(``compressor.errors``, ``config``, ``checkpoints``) and ``edge_runtime``'s latency-table format;
never ``train``, ``run``, ``export`` or the pipeline.
"""
