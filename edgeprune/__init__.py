"""edgeprune: prune PyTorch models with learning-rate rewinding and run them fast on a Raspberry Pi.

This package is only the command-line front. The work lives in four sibling packages that follow
the data's one-way flow: ``compressor`` (train and prune, export) → ``deploy`` (ship over SSH) →
``edge_runtime`` (run on the device) → ``benchmarks`` (measure).
"""

from edge_runtime import __version__  # the one version string (edge_runtime imports lazily)

__all__ = ["__version__"]
