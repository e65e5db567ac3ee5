"""The node-count benchmark's own arithmetic (``bench/bench_nodes.py``): which CPU reading it
trusts, and what its table says from what the runs measured. No sockets, no processes."""

from __future__ import annotations

import os

from bench.bench_nodes import FLOOR, TICK, CpuMark, Measure, cpu_used, parse_args, table


def test_cpu_is_the_nanoseconds_while_they_agree_with_the_ticks() -> None:
    # 1.234567 s of runtime, reported as 1.23 s of ticks: the nanoseconds count.
    assert cpu_used(CpuMark(10.00, 10_000_000_000), CpuMark(11.23, 11_234_567_000)) == 1.234567


def test_cpu_is_the_ticks_when_a_thread_ended_or_schedstat_is_not_kept() -> None:
    # A thread that ran 0.5 s ended: the live threads' nanoseconds lost it, the ticks did not.
    assert cpu_used(CpuMark(10.0, 10_000_000_000), CpuMark(11.5, 11_000_000_000)) == 1.5
    assert cpu_used(CpuMark(10.0, 0), CpuMark(10.5, 0)) == 0.5
    assert cpu_used(CpuMark(10.0, None), CpuMark(10.5, None)) == 0.5
    assert cpu_used(CpuMark(10.0, 5), CpuMark(0.0, None)) == 0.0  # gone: nothing, not negative
    assert TICK == 1 / os.sysconf("SC_CLK_TCK")


def measure(column: str, k: int, rnd: int, redis_cpu: float, node_cpu: float,
            events: int = 1000) -> Measure:
    return Measure(column, k, rnd, events=events, redis_cpu=redis_cpu, node_cpu=node_cpu)


def test_the_table_has_medians_per_event_and_per_node_and_the_ratio_to_the_smallest_k() -> None:
    runs = [
        measure(FLOOR, 2, 1, 0.050, 0.400), measure("gateway", 2, 1, 0.100, 0.800),
        measure("gateway", 2, 2, 0.120, 0.900), measure("gateway", 2, 3, 0.500, 0.100),
        measure(FLOOR, 8, 1, 0.080, 1.600), measure("gateway", 8, 1, 0.300, 3.200),
        measure("gateway", 8, 2, 0.0, 0.0, events=0),  # aborted: no figure, not a zero
    ]
    lines = table(runs, [FLOOR, "gateway"], [2, 8])
    assert lines[0] == ("| K | floor Redis µs/event | floor node µs/event/node | gateway Redis µs/event "
                        "| gateway node µs/event/node | gateway Redis x K=2 |")
    # K=2: the gateway's medians of 100/120/500 µs and 400/450/50 µs per node; ratio 1.
    assert lines[2] == "| 2 | 50.0 | 200.0 | 120.0 | 400.0 | 1.00x |"
    # K=8: 300 µs per event against 120; 3.2 s over 1000 events and 8 nodes.
    assert lines[3] == "| 8 | 80.0 | 200.0 | 300.0 | 400.0 | 2.50x |"


def test_quick_and_full_defaults_and_one_column_per_gateway_root() -> None:
    quick = parse_args(["--quick"])
    assert (quick.nodes, quick.events, quick.columns) == ([1, 2], 400, [FLOOR, "gateway"])
    full = parse_args(["--nodes", "8,1,4", "--gateway-root", "/tmp/a", "--gateway-root", "/tmp/b"])
    assert (full.nodes, full.events, full.rounds) == ([1, 4, 8], 2000, 3)
    assert full.timeout == 120 + 3 * 3 * 3 * (45 + 2 * 2100 / 200)  # rounds x Ks x columns
    assert full.columns == [FLOOR, "gw1:a", "gw2:b"]
