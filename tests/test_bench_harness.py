"""``benchmarks/harness.py``: the provenance every benchmark row carries."""

from __future__ import annotations

from run_utils import load_benchmark

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_int8

processor\t: 1
model name\t: a second socket is not read
"""


def test_cpu_description_names_the_model_and_the_gemm_extensions():
    harness = load_benchmark("harness")
    assert harness.cpu_description(CPUINFO) == {
        "cpu_model": "Intel(R) Xeon(R) Platinum 8480+ (family 6, model 143)",
        "cpu_isa": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8"]}
    bare = harness.cpu_description("")
    assert bare["cpu_isa"] == [] and bare["cpu_model"]  # no /proc/cpuinfo: the platform's name, no extensions


def test_environment_carries_the_cpu():
    env = load_benchmark("harness").environment()
    assert {"cpu_model", "cpu_isa", "device", "torch", "git_sha"} <= env.keys()
