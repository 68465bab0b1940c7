"""Running experiments: run directories, resumable arms, provenance.

A run writes ``<out>/<experiment>/<UTC timestamp>/``::

    config.json     experiment, profile, config, seed, library versions, git revision, command
    arms/<key>.json one file per finished arm (written atomically as soon as the arm ends)
    metrics.json    flat metrics (numbers, units in the key names)
    *.png           figures
    summary.md      human-readable summary; written last, so its presence marks a complete run

``resume_run(run_dir)`` re-reads ``config.json`` and runs only the arms without a result file.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from optfm.experiments.base import PROFILES, Experiment, RunContext, get_experiment
from optfm.experiments.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)
from optfm.training.io import atomic_write_json, atomic_write_text, read_json
from optfm.training.progress import progress
from optfm.training.threads import limit_threads, thread_settings

__all__ = [
    "RunError",
    "build_config",
    "git_revision",
    "is_complete",
    "library_versions",
    "resume_run",
    "run_experiment",
]

# Third-party warnings that fire on every step of correct code and would bury a run's log.
_HARMLESS_WARNINGS = (
    "Full backward hook is firing",          # Opacus hooks on a first layer whose input needs no grad
    "Optimal order is the largest alpha",    # Opacus's RDP order grid, at large noise
    "Secure RNG turned off",                 # Opacus; experiments seed their generators on purpose
)

_LIBRARIES = ("optfm", "torch", "numpy", "scipy", "scikit-learn", "transformers", "diffusers",
              "tokenizers", "safetensors", "opacus", "matplotlib")


class RunError(RuntimeError):
    """A run directory that cannot be resumed (missing, not a run, or a different experiment)."""


def library_versions() -> dict[str, str]:
    """Python and the installed versions of the libraries optfm's results depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def git_revision() -> str | None:
    """Git commit of the optfm source tree (``+dirty`` with uncommitted changes), if known."""
    src = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def build_config(exp: type[Experiment], profile: str = "quick", overrides: Iterable[str] = (),
                 seed: int | None = None) -> ExperimentConfig:
    """Profile config, then ``--set`` overrides, then ``--seed``; validated."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose from: {', '.join(PROFILES)}")
    cfg = exp.config(profile)
    items = list(overrides)
    if seed is not None:
        items.append(f"seed={seed}")
    return apply_overrides(cfg, items) if items else cfg


def _new_run_dir(out_root: Path, name: str) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = out_root / name
    base.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        d = base / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RunError(f"could not create a fresh run directory under {base}")


def is_complete(run_dir: str | os.PathLike) -> bool:
    """True when the run finished (``summary.md`` and ``metrics.json`` exist)."""
    d = Path(run_dir)
    return (d / "summary.md").is_file() and (d / "metrics.json").is_file()


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def _check_metrics(metrics: dict[str, Any], name: str) -> dict[str, float | int | None]:
    out: dict[str, float | int | None] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: metric {k!r} must be a number, got {type(v).__name__}")
        out[k] = v if (isinstance(v, int) or math.isfinite(v)) else None
    return out


def run_experiment(name: str, *, profile: str = "quick", overrides: Iterable[str] = (),
                   seed: int | None = None, out_root: str | os.PathLike = "runs",
                   verbose: bool = True, config: ExperimentConfig | None = None) -> Path:
    """Run an experiment into a new run directory and return it."""
    exp_cls = get_experiment(name)
    cfg = config if config is not None else build_config(exp_cls, profile, overrides, seed)
    run_dir = _new_run_dir(Path(out_root), name)
    atomic_write_json(run_dir / "config.json", {
        "experiment": name,
        "profile": profile,
        "seed": cfg.seed,
        "config": config_to_dict(cfg),
        "versions": library_versions(),
        "git_revision": git_revision(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "platform": platform.platform(),
        "threads": cfg.threads,
    })
    _log(verbose, f"{name}: profile {profile}, writing {run_dir}")
    return _execute(exp_cls, cfg, run_dir, profile, verbose)


def resume_run(run_dir: str | os.PathLike, *, verbose: bool = True) -> Path:
    """Continue a run whose process was killed: finished arms are loaded, the rest run."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise RunError(f"run directory not found: {run_dir}")
    if not cfg_path.is_file():
        raise RunError(f"{run_dir} is not a run directory (no config.json)")
    meta = read_json(cfg_path)
    exp_cls = get_experiment(meta["experiment"])
    cfg = config_from_dict(exp_cls.config_cls, meta["config"])
    _log(verbose, f"{exp_cls.name}: resuming {run_dir}")
    return _execute(exp_cls, cfg, run_dir, meta.get("profile", "quick"), verbose)


def _execute(exp_cls: type[Experiment], cfg: ExperimentConfig, run_dir: Path, profile: str,
             verbose: bool) -> Path:
    exp = exp_cls()
    ctx = RunContext(run_dir, profile=profile, verbose=verbose)
    arms = exp.arms(cfg)
    keys = [a.key for a in arms]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{exp_cls.name}: arm keys are not unique")
    arms_dir = run_dir / "arms"
    arms_dir.mkdir(exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    arm_seconds = 0.0  # every arm's own run time, also those finished by an earlier process
    t_start = time.perf_counter()
    with limit_threads(cfg.threads or None), warnings.catch_warnings():
        for msg in _HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=msg)
        threads = thread_settings()
        done = 0
        bar = progress(total=len(arms), desc=exp_cls.name, unit="arm")
        for arm in arms:
            path = arms_dir / f"{arm.key}.json"
            if path.is_file():
                stored = read_json(path)
                results[arm.key] = stored["result"]
                arm_seconds += float(stored.get("elapsed_s", 0.0))
                done += 1
                bar.update(1)
                continue
            t0 = time.perf_counter()
            result = exp.run_arm(cfg, arm, ctx)
            elapsed = time.perf_counter() - t0
            arm_seconds += elapsed
            atomic_write_json(path, {"arm": arm.key, "params": arm.params, "elapsed_s": elapsed,
                                     "result": result})
            results[arm.key] = read_json(path)["result"]  # exactly what a resume would see
            bar.update(1)
            _log(verbose and bar.disable, f"  {exp_cls.name}: arm {arm.key} done ({elapsed:.1f} s)")
        bar.close()
        if done:
            _log(verbose, f"{exp_cls.name}: {done} finished arm(s) loaded, {len(arms) - done} run")
        outcome = exp.finalize(cfg, results, ctx)
    metrics = _check_metrics(outcome.metrics, exp_cls.name)
    metrics["wall_time_s"] = round(time.perf_counter() - t_start, 3)  # this process only
    metrics["arms_time_s"] = round(arm_seconds, 3)  # survives a resume
    atomic_write_json(run_dir / "metrics.json", metrics)
    header = (
        f"# {exp_cls.name}\n\n"
        f"{exp_cls.description}\n\n"
        f"- profile: `{profile}`, base seed {cfg.seed}, {len(arms)} arms, "
        f"{threads['torch_num_threads']} torch thread(s)\n"
        f"- run directory: `{run_dir}`\n\n"
    )
    atomic_write_text(run_dir / "summary.md", header + outcome.summary.strip() + "\n")
    _log(verbose, f"{exp_cls.name}: done in {metrics['wall_time_s']:.1f} s -> {run_dir / 'summary.md'}")
    return run_dir
