"""The one benchmark harness: warm-up, many repeats, median and spread, provenance on every row.

Conventions (DESIGN.md "Benchmarks"): every figure is reported as a ratio against a baseline measured
in the same run; rows are appended to ``benchmarks/results/<name>.jsonl`` and a markdown table is
generated next to it. On GPU, times come from CUDA events; on CPU from ``time.perf_counter``.

Usage in a ``bench_*.py`` script::

    from harness import Bench, time_fn
    bench = Bench("bitlinear_cpu")
    t = time_fn(lambda: layer(x).sum().backward())
    bench.add(shape="4096x4096", impl="BitLinear", median_ms=t.median_ms, ratio_vs_linear=...)
    bench.write(columns=[...])
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Timing:
    """Times of one callable, in milliseconds."""

    median_ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: the relative spread of the samples."""
        return (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms else 0.0


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def time_fn(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20, min_time_s: float = 0.0,
            device: torch.device | str | None = None) -> Timing:
    """Median time of ``fn()`` after ``warmup`` calls, over at least ``repeats`` calls (and ``min_time_s``)."""
    device = torch.device(device) if device is not None else None
    cuda = device is not None and device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start_all < min_time_s:
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(samples), min(samples), _quantile(samples, 0.2), _quantile(samples, 0.8),
                  len(samples))


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, repeats: int = 10) -> dict[str, Timing]:
    """Time several CPU callables round-robin (one call of each per round), so that load from other
    processes hits every candidate alike and their ratios stay fair. Returns ``{name: Timing}``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: Timing(statistics.median(s), min(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s))
            for name, s in samples.items()}


def cuda_graph_time_ms(calls: Sequence[Callable[[], object]], *, repeats: int = 20) -> float:
    """Median ms per call of ``calls`` captured back to back in one CUDA graph and replayed.

    The calls run once on a side stream first (allocations, autotuning, scratch buffers happen outside
    the graph). Rotating inputs across the calls keeps a small working set from sitting in L2.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    t = time_fn(graph.replay, warmup=3, repeats=repeats, device="cuda")
    return t.median_ms / len(calls)


def peak_memory_growth(fn: Callable[[], object]) -> int:
    """Bytes by which this process's resident high-water mark grows while ``fn()`` runs (Linux).

    Resets the high-water mark through ``/proc/self/clear_refs`` first, so earlier peaks don't hide it.
    """
    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    fn()
    return status("VmHWM:") - before


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


CPU_ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_description(cpuinfo: str | None = None) -> dict:
    """``{"cpu_model": str, "cpu_isa": [str]}``: the CPU's name with its family and model numbers, and which of the
    extensions that move this project's CPU numbers (int8 and bfloat16 GEMMs) it has, from ``/proc/cpuinfo`` (or the
    text given). Rows whose entries differ came from different hardware: compare them only through a baseline
    measured in the same run (VM types differ by tens of percent in training steps per CPU-second)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    first = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            first.setdefault(key.strip(), value.strip())
    name = first.get("model name", platform.processor() or platform.machine())
    if "cpu family" in first and "model" in first:
        name += f" (family {first['cpu family']}, model {first['model']})"
    flags = set(first.get("flags", "").split())
    return {"cpu_model": name, "cpu_isa": [f for f in CPU_ISA if f in flags]}


def environment() -> dict:
    """Device, CPU, versions and git sha recorded on every row."""
    import transformers

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    env = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "git_sha": _git_sha(),
           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **cpu_description()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


class Bench:
    """Collects rows of one benchmark, then appends them as JSONL and regenerates the markdown table."""

    def __init__(self, name: str, results_dir: Path = RESULTS) -> None:
        self.name = name
        self.results_dir = Path(results_dir)
        self.env = environment()
        self.rows: list[dict] = []

    def add(self, **fields) -> dict:
        row = {"bench": self.name, **fields, **self.env}
        self.rows.append(row)
        return row

    def write(self, columns: Sequence[str], title: str | None = None, note: str = "") -> Path:
        """Append this run's rows to ``<name>.jsonl`` and write ``<name>.md`` with this run's table."""
        self.results_dir.mkdir(parents=True, exist_ok=True)
        jsonl = self.results_dir / f"{self.name}.jsonl"
        with jsonl.open("a") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        md = self.results_dir / f"{self.name}.md"
        md.write_text(self.markdown(columns, title, note))
        return md

    def markdown(self, columns: Sequence[str], title: str | None = None, note: str = "") -> str:
        e = self.env
        lines = [f"# {title or self.name}", "",
                 f"Device: **{e['device']}**; torch {e['torch']}, transformers {e['transformers']}, "
                 f"triton {e['triton']}, git {e['git_sha']}, {e['date']}.", ""]
        if note:
            lines += [note, ""]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "---|" * len(columns))
        for row in self.rows:
            lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
        return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
