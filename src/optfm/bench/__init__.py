"""Performance benchmarks: cost ratios against a baseline measured in the same process.

Importing this package registers every benchmark; ``optfm bench NAME|all`` runs them.
"""

from optfm.bench import (  # noqa: F401  (registers the benchmarks)
    advunlearn,
    alignment,
    attention,
    contrastive,
    digits,
    dno,
    privacy,
    sltrain,
    unlearning,
)
from optfm.bench.core import (
    BenchRow,
    UnknownBenchmarkError,
    benchmark_names,
    format_table,
    get_benchmark,
    register_benchmark,
    steady_allocator,
    time_pair,
)

__all__ = [
    "BenchRow",
    "UnknownBenchmarkError",
    "benchmark_names",
    "format_table",
    "get_benchmark",
    "register_benchmark",
    "steady_allocator",
    "time_pair",
]
