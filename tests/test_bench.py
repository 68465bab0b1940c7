import time

import pytest

from optfm.bench import BenchRow, format_table, time_pair


def test_time_pair_orders_costs():
    slow, fast = time_pair(lambda: time.sleep(0.002), lambda: None, repeats=3, number=2, warmup=0)
    assert slow > 0.0015 and fast < slow / 5
    with pytest.raises(ValueError, match="repeats"):
        time_pair(lambda: None, lambda: None, repeats=0)


def test_row_ratio_target_and_table():
    ok = BenchRow("b", "fast path", 1.0e-3, 1.0e-3, "s", target=1.05)
    bad = BenchRow("b", "slow path", 2.0, 1.0, "bytes", target=1.5, note="why it is slow")
    info = BenchRow("b", "report only", 3.0, 2.0, "x")
    assert ok.ok is True and bad.ok is False and info.ok is None
    assert bad.ratio == 2.0 and bad.as_dict()["ok"] is False
    table = format_table([ok, bad, info])
    assert "1.000 ms" in table and "NO" in table and "why it is slow" in table
