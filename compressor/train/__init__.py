"""Training: models, data, batches, devices, the learning-rate schedule and the retraining methods.

Owns the model registry (``models``), the data sets and loaders (``data``, ``batches``), where a run
computes (``devices``, ``distributed`` for torchrun), one epoch of masked training (``training``) and
what each retraining method replays (``methods``, ``schedules``, ``optimizers``). It may import the
base modules (``compressor.errors``, ``config``, ``checkpoints``) and ``compressor.prune`` (a mask is
what training keeps at zero); never ``run``, ``export`` or the pipeline.
"""
