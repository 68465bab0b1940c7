"""optfm: optimization methods for training foundation models that are private, aligned,
unlearnable and efficient.

Layers (dependencies point downward only)::

    cli                                  optfm list | run | report | bench
    experiments, report, bench           reproductions, report assembly, benchmarks
    privacy, pretraining, unlearning,    the methods (components + trainers)
    alignment, contrastive, attention
    diffusion, models, data, training    shared building blocks
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("optfm")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
