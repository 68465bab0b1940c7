"""The ``optfm`` command.

    optfm list
    optfm run NAME|all [--profile smoke|quick|full] [--set key=value ...] [--seed N] [--out DIR]
    optfm run --resume RUN_DIR
    optfm report [RUN_DIR ...] [--runs DIR] [--out DIR]
    optfm bench NAME|all [--repeats N] [--threads N] [--json PATH] [--check]

Bad input exits with status 2 and one line naming the problem and the allowed values.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main"]


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="optfm", description="optfm: reproductions, reports and benchmarks.")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or log lines")
    sub = p.add_subparsers(dest="command", metavar="{list,run,report,bench}", parser_class=_Parser)
    sub.required = True

    sub.add_parser("list", help="list experiments and benchmarks")

    r = sub.add_parser("run", help="run an experiment (or all, then the report)")
    r.add_argument("name", nargs="?", help="experiment name or 'all'")
    r.add_argument("--profile", default="quick", help="smoke, quick (default) or full")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    r.add_argument("--seed", type=int, default=None, help="base seed")
    r.add_argument("--out", default="runs", help="runs root directory (default: runs)")
    r.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a killed run; finished arms are not redone")
    r.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)

    rep = sub.add_parser("report", help="assemble runs into report.md and report.html")
    rep.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                     help="runs to include (default: newest complete run per experiment)")
    rep.add_argument("--runs", default="runs", help="runs root to search (default: runs)")
    rep.add_argument("--out", default=None, help="output directory (default: the runs root)")

    b = sub.add_parser("bench", help="run benchmarks and print ratios")
    b.add_argument("name", help="benchmark name or 'all'")
    b.add_argument("--repeats", type=int, default=7, help="timing rounds (median is reported)")
    b.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    b.add_argument("--json", default=None, metavar="PATH", help="also write rows as JSON")
    b.add_argument("--check", action="store_true", help="exit 1 if a row misses its target")
    b.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)
    return p


def _cmd_list() -> int:
    from optfm.bench import benchmark_names, get_benchmark
    from optfm.experiments import experiment_names, get_experiment

    print("experiments (minutes on 2 CPU cores: smoke / quick / full):")
    names = experiment_names()
    w = max((len(n) for n in names), default=0)
    for n in names:
        e = get_experiment(n)
        mins = " / ".join(f"{e.minutes.get(p, float('nan')):g}" for p in ("smoke", "quick", "full"))
        print(f"  {n.ljust(w)}  {e.description}  [{mins}]")
    print("benchmarks:")
    bn = benchmark_names()
    w = max((len(n) for n in bn), default=0)
    for n in bn:
        print(f"  {n.ljust(w)}  {get_benchmark(n)[0]}")
    return 0


def _cmd_run(args: argparse.Namespace, verbose: bool) -> int:
    from optfm.experiments import (
        PROFILES,
        build_config,
        experiment_names,
        get_experiment,
        resume_run,
        run_experiment,
    )
    from optfm.report import build_report

    if args.resume:
        if args.name or args.overrides or args.seed is not None or args.profile != "quick":
            raise UsageError("--resume takes the run's stored config; do not combine it with a "
                             "name, --profile, --set or --seed")
        run_dir = Path(args.resume)
        if not run_dir.is_dir():
            raise UsageError(f"--resume: run directory not found: {run_dir}")
        if not (run_dir / "config.json").is_file():
            raise UsageError(f"--resume: {run_dir} is not a run directory (no config.json)")
        resume_run(run_dir, verbose=verbose)
        return 0
    if not args.name:
        raise UsageError("run needs an experiment name or 'all'; choose from: "
                         + ", ".join([*experiment_names(), "all"]))
    if args.profile not in PROFILES:
        raise UsageError(f"--profile must be one of {', '.join(PROFILES)}, got {args.profile!r}")
    if args.name != "all" and args.name not in experiment_names():
        raise UsageError(f"unknown experiment {args.name!r}; choose from: "
                         + ", ".join([*experiment_names(), "all"]))
    names = experiment_names() if args.name == "all" else [args.name]
    for n in names:  # validate everything before running anything
        build_config(get_experiment(n), args.profile, args.overrides, args.seed)
    done, failed = [], []
    for n in names:
        try:
            done.append(run_experiment(n, profile=args.profile, overrides=args.overrides,
                                       seed=args.seed, out_root=args.out, verbose=verbose))
        except Exception as e:  # keep going: one broken experiment must not hide the others
            if args.name != "all":
                raise
            failed.append(n)
            print(f"optfm: {n} failed: {type(e).__name__}: {e}", file=sys.stderr)
    if args.name == "all":
        md, html = build_report(done, runs_root=args.out)
        print(f"report: {md} and {html}")
    else:
        print(f"run: {done[0]}")
    if failed:
        print(f"optfm: {len(failed)} experiment(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from optfm.report import build_report

    md, html = build_report(args.run_dirs or None, runs_root=args.runs, out_dir=args.out)
    print(f"report: {md} and {html}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from optfm.bench import benchmark_names, format_table, get_benchmark, steady_allocator
    from optfm.training import limit_threads, thread_settings
    from optfm.training.io import atomic_write_json

    names = benchmark_names() if args.name == "all" else [args.name]
    fns = [get_benchmark(n) for n in names]
    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    rows = []
    steady_allocator()  # no page-fault noise from glibc trimming between timed steps
    with limit_threads(args.threads):
        settings = thread_settings()
        print("threads: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        for _, fn in fns:
            rows.extend(fn(args.repeats))
    print(format_table(rows))
    if args.json:
        atomic_write_json(args.json, {"threads": settings, "rows": [r.as_dict() for r in rows]})
    if args.check and any(r.ok is False for r in rows):
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    from optfm.bench import UnknownBenchmarkError
    from optfm.experiments import ConfigError, RunError, UnknownExperimentError
    from optfm.report.build import ReportError
    from optfm.training.progress import set_quiet

    try:
        args = _parser().parse_args(argv)
        quiet = bool(getattr(args, "quiet", False))
        if quiet:
            set_quiet(True)
        if args.command == "list":
            return _cmd_list()
        if args.command == "run":
            return _cmd_run(args, verbose=not quiet)
        if args.command == "report":
            return _cmd_report(args)
        return _cmd_bench(args)
    except (UsageError, ConfigError, UnknownExperimentError, UnknownBenchmarkError, RunError,
            ReportError) as e:
        print(f"optfm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("optfm: interrupted; finished arms are saved (resume with --resume RUN_DIR)",
              file=sys.stderr)
        return 130
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

