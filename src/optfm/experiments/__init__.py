"""Reproductions: one module per experiment, each registered with :func:`register`.

An experiment holds a protocol (arms, seeds, grids); algorithms live in the method packages.
Importing this package registers every experiment.
"""

from optfm.experiments import (  # noqa: F401  (register)
    alignment,
    attention,
    concept_erasure,
    contrastive,
    digits_baseline,
    dno,
    dp_audit,
    dp_filters,
    dp_text,
    sltrain,
    sltrain_memory,
    unlearning,
)
from optfm.experiments.base import (
    PROFILES,
    Arm,
    Experiment,
    Outcome,
    RunContext,
    UnknownExperimentError,
    experiment_names,
    get_experiment,
    register,
)
from optfm.experiments.config import ConfigError, ExperimentConfig
from optfm.experiments.runner import RunError, build_config, is_complete, resume_run, run_experiment

__all__ = [
    "PROFILES",
    "Arm",
    "ConfigError",
    "Experiment",
    "ExperimentConfig",
    "Outcome",
    "RunContext",
    "RunError",
    "UnknownExperimentError",
    "build_config",
    "experiment_names",
    "get_experiment",
    "is_complete",
    "register",
    "resume_run",
    "run_experiment",
]
