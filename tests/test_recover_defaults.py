"""``recover``'s defaults: bfloat16 autocast on a CPU-only host with bfloat16 GEMMs, float32 elsewhere; flags win."""

from __future__ import annotations

import pytest
import torch

from bitdistill import host
from bitdistill.cli.hfargs import parse_dataclasses
from bitdistill.cli.main import build_parser
from bitdistill.cli.recover import _types
from bitdistill.distill.args import DISTILL_DEFAULTS
from bitdistill.recover import staged


@pytest.mark.parametrize(("flags", "expected"), [("fpu sse avx2 avx512f avx512_bf16 avx512_vnni", True),
                                                  ("fpu sse avx2 amx_tile amx_bf16", True),
                                                  ("fpu sse avx2 avx512f avx512_vnni", False)])
def test_cpu_has_bf16_reads_the_flags(tmp_path, flags, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert host.cpu_has_bf16(info) is expected
    assert host.cpu_has_bf16(tmp_path / "absent") is False


@pytest.mark.parametrize(("cuda", "bf16"), [(False, True), (False, False), (True, True)])
def test_recover_defaults_add_bf16_only_on_a_cpu_host_with_bf16_gemms(monkeypatch, cuda, bf16):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(host, "cpu_has_bf16", lambda: bf16)
    defaults = staged.recover_defaults()
    assert {k: v for k, v in defaults.items() if k not in ("bf16", "use_cpu")} == DISTILL_DEFAULTS
    assert defaults.get("bf16", False) is (bf16 and not cuda)
    assert defaults.get("use_cpu", False) is (bf16 and not cuda)


def test_an_explicit_flag_overrides_the_bf16_default(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(host, "cpu_has_bf16", lambda: True)
    base = ["recover", "--teacher_model_name_or_path", "tiny:llama", "--output_dir", str(tmp_path / "out")]
    for extra, expected in (([], True), (["--bf16", "false"], False)):
        args = build_parser(["recover"]).parse_args([*base, *extra])
        training_args = parse_dataclasses(args, _types(), defaults=staged.recover_defaults())[3]
        assert training_args.bf16 is expected
