"""The decode benchmark's bandwidth figures (benchmarks/bench_decode_cpu.py)."""

from __future__ import annotations

import pytest
from run_utils import load_benchmark

bench = load_benchmark("bench_decode_cpu")


def test_paired_share_is_the_median_of_each_rounds_bytes_per_second_over_its_own_copy():
    # rounds: 100 MB a step at 200, 100 and 300 steps/s beside copies of 40, 50 and 60 GB/s -> 0.5, 0.2, 0.5
    assert bench.paired_share(100_000_000, [200.0, 100.0, 300.0], [40e9, 50e9, 60e9]) == pytest.approx(0.5)
    # a batch of 4 reads the weights once a step: 4 sequences' 800 tokens/s are 200 steps/s
    assert bench.paired_share(100_000_000, [800.0], [40e9], tokens_per_step=4) == pytest.approx(0.5)


def test_paired_share_refuses_rounds_without_their_copy():
    with pytest.raises(ValueError, match="one copy per round"):
        bench.paired_share(1, [1.0, 2.0], [1.0])


def test_copy_probe_measures_read_and_written_bytes_with_buffers_allocated_once():
    probe = bench.CopyProbe(mib=4)
    src = probe.src.data_ptr()
    rates = [probe(repeats=2) for _ in range(3)]
    assert all(r > 1e8 for r in rates)  # bytes per second: any machine copies 4 MiB faster than 100 MB/s
    assert probe.src.data_ptr() == src and probe.dst.numel() == 2**20
