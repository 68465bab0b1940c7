"""The experiment contract and registry.

An experiment is a protocol, not an algorithm: it lists *arms* (one training run each: a method,
a hyperparameter, a seed), runs one arm at a time, and turns the arm results into metrics, plots
and a summary. The runner (:mod:`optfm.experiments.runner`) stores every finished arm at once, so a
killed run resumes without redoing finished arms.
"""

from __future__ import annotations

import abc
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from optfm.experiments.config import ExperimentConfig
from optfm.training.io import atomic_write_bytes

__all__ = [
    "PROFILES",
    "Arm",
    "Experiment",
    "Outcome",
    "RunContext",
    "UnknownExperimentError",
    "experiment_names",
    "get_experiment",
    "pyplot",
    "register",
]

PROFILES = ("smoke", "quick", "full")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


@dataclass(frozen=True)
class Arm:
    """One unit of work. ``key`` names it on disk (letters, digits, ``._+=-``)."""

    key: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _KEY.match(self.key):
            raise ValueError(f"arm key {self.key!r} must match {_KEY.pattern}")


@dataclass
class Outcome:
    """What :meth:`Experiment.finalize` returns.

    ``metrics``: flat ``name -> number`` with the unit in the name (``step_time_s``,
    ``test_acc``); ``summary``: Markdown body of ``summary.md`` (figures referenced by file name).
    """

    metrics: dict[str, float]
    summary: str


class RunContext:
    """Handed to an experiment while it runs: where to write, and how to save figures."""

    def __init__(self, run_dir: Path, *, profile: str, verbose: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.profile = profile
        self.verbose = verbose
        self.figures: list[str] = []

    def path(self, name: str) -> Path:
        """A path inside the run directory."""
        return self.run_dir / name

    def arm_dir(self, arm: Arm) -> Path:
        """A private scratch directory for one arm (checkpoints of long arms go here)."""
        d = self.run_dir / "arms" / arm.key
        d.mkdir(parents=True, exist_ok=True)
        return d

    def savefig(self, fig: Any, name: str, *, dpi: int = 110) -> str:
        """Save a matplotlib figure as PNG atomically, close it, and return its file name."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(self.run_dir / name, buf.getvalue())
        self.figures.append(name)
        return name


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (safe on machines without a screen)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


class Experiment(abc.ABC):
    """Subclass, set the class attributes, implement the four methods, decorate with
    :func:`register`."""

    name: ClassVar[str]
    #: One line: what the experiment shows.
    description: ClassVar[str]
    config_cls: ClassVar[type[ExperimentConfig]]
    #: Expected minutes per profile on 2 CPU cores.
    minutes: ClassVar[dict[str, float]]

    @classmethod
    @abc.abstractmethod
    def profiles(cls) -> dict[str, ExperimentConfig]:
        """``{"smoke": ..., "quick": ..., "full": ...}``."""

    @classmethod
    def config(cls, profile: str = "quick") -> ExperimentConfig:
        """The config of a named profile."""
        profiles = cls.profiles()
        if profile not in profiles:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
        cfg = profiles[profile]
        cfg.validate()
        return cfg

    @abc.abstractmethod
    def arms(self, config: Any) -> list[Arm]:
        """The arms of this config, in the order they run."""

    @abc.abstractmethod
    def run_arm(self, config: Any, arm: Arm, ctx: RunContext) -> dict[str, Any]:
        """Run one arm and return its result (JSON-serialisable)."""

    @abc.abstractmethod
    def finalize(self, config: Any, results: dict[str, dict[str, Any]], ctx: RunContext) -> Outcome:
        """Turn ``{arm key: result}`` into metrics, figures (``ctx.savefig``) and a summary."""


_REGISTRY: dict[str, type[Experiment]] = {}


class UnknownExperimentError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def register(cls: type[Experiment]) -> type[Experiment]:
    """Class decorator adding an experiment to the registry (names are unique)."""
    for attr in ("name", "description", "config_cls", "minutes"):
        if not hasattr(cls, attr):
            raise TypeError(f"experiment {cls.__name__} must define {attr}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"experiment name {cls.name!r} is already registered")
    missing = set(PROFILES) - set(cls.profiles())
    if missing:
        raise TypeError(f"experiment {cls.name} lacks profiles {sorted(missing)}")
    _REGISTRY[cls.name] = cls
    return cls


def experiment_names() -> list[str]:
    """Registered experiment names, in registration order."""
    return list(_REGISTRY)


def get_experiment(name: str) -> type[Experiment]:
    """The experiment class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownExperimentError(
            f"unknown experiment {name!r}; choose from: {', '.join(_REGISTRY) or '(none)'}"
        ) from None
