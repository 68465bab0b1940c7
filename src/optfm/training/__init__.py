"""Shared training helpers: seeding, devices, threads, checkpoints, metric logs, progress, loops."""

from optfm.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from optfm.training.device import autocast, resolve_device
from optfm.training.io import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    to_jsonable,
)
from optfm.training.loop import accuracy, minibatch_indices
from optfm.training.memory import (
    current_rss_bytes,
    peak_rss_bytes,
    peak_tensor_bytes,
    reset_peak_rss,
    saved_activation_bytes,
)
from optfm.training.metrics import MetricLogger, read_jsonl
from optfm.training.progress import is_quiet, progress, set_quiet
from optfm.training.seed import make_generator, seed_everything
from optfm.training.threads import limit_threads, thread_settings

__all__ = [
    "Checkpoint",
    "MetricLogger",
    "accuracy",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "autocast",
    "current_rss_bytes",
    "is_quiet",
    "limit_threads",
    "load_checkpoint",
    "make_generator",
    "minibatch_indices",
    "peak_rss_bytes",
    "peak_tensor_bytes",
    "progress",
    "read_json",
    "read_jsonl",
    "reset_peak_rss",
    "resolve_device",
    "save_checkpoint",
    "saved_activation_bytes",
    "seed_everything",
    "set_quiet",
    "thread_settings",
    "to_jsonable",
]
