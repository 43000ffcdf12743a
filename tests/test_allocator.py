"""bitdistill.allocator: the training commands keep freed heap memory; same results, fewer page faults."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from run_utils import tiny_gpt2_vocab_folder

import bitdistill.cli.main as cli_main
from bitdistill import allocator
from bitdistill.allocator import KEEP_FREED_MEMORY, OPT_OUT, keep_freed_memory, user_chose_allocator

REPO = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                           reason="mallopt tuning is glibc-only")

# Three rounds of 100 x 1 MiB blocks, each written and freed; prints what keep_freed_memory() returned and the
# minor page faults of the third round. Under glibc's defaults the first round's blocks are mapped, and freeing
# them raises the mmap threshold to ~1 MiB and the trim threshold to ~2 MiB, so later rounds come from the heap
# and its freed top (100 MiB) is trimmed after each: every round faults its 25,600 pages in again. Kept, the
# third round faults almost nothing.
_PROBE = """
import ctypes, json, resource
from bitdistill.allocator import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def round_():
    blocks = [libc.malloc(2**20) for _ in range(100)]
    for b in blocks:
        ctypes.memset(b, 1, 2**20)
    for b in blocks:
        libc.free(b)
round_(); round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _clean_env() -> dict[str, str]:
    """This process's environment without any allocator choice (so the default, tuning, applies)."""
    return {k: v for k, v in os.environ.items() if not user_chose_allocator({k: v})}


def _probe(env_extra: dict[str, str]) -> dict:
    env = _clean_env()
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**env, **env_extra}, capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    return json.loads(out)


@glibc
def test_kept_memory_is_reused_without_page_faults():
    kept = _probe({})
    assert kept["applied"] == KEEP_FREED_MEMORY
    assert kept["faults"] < 1000
    default = _probe({OPT_OUT: "0"})  # the user's opt-out wins: nothing is changed
    assert default["applied"] is None
    assert default["faults"] > 20000


@pytest.mark.parametrize("env", [{OPT_OUT: "0"}, {"MALLOC_MMAP_THRESHOLD_": "131072"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                                 {"MALLOC_TOP_PAD_": "0"}, {"MALLOC_MMAP_MAX_": "0"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                                 {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}])
def test_user_allocator_choices_are_left_alone(env, monkeypatch):
    assert user_chose_allocator(env)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert keep_freed_memory() is None


def test_unrelated_settings_do_not_opt_out():
    assert not user_chose_allocator({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2", OPT_OUT: "1", "LD_PRELOAD": "libx.so"})


def test_other_platforms_and_c_libraries_are_a_no_op(monkeypatch):
    monkeypatch.setattr(os, "environ", _clean_env())
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert keep_freed_memory() is None
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: object())  # no gnu_get_libc_version: musl
    assert keep_freed_memory() is None


def test_a_refused_setting_is_skipped_not_raised(monkeypatch):
    monkeypatch.setattr(os, "environ", _clean_env())
    monkeypatch.setattr(allocator.sys, "platform", "linux")

    class FakeGlibc:
        gnu_get_libc_version = None

        @staticmethod
        def mallopt(param: int, value) -> int:
            return 0 if param == -3 else 1  # refuses M_MMAP_THRESHOLD, as a 32-bit glibc refuses 32 MiB

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: FakeGlibc())
    assert keep_freed_memory() == {k: v for k, v in KEEP_FREED_MEMORY.items() if k != "M_MMAP_THRESHOLD"}
    monkeypatch.setattr(FakeGlibc, "mallopt", staticmethod(lambda param, value: 0))
    assert keep_freed_memory() is None


@pytest.mark.parametrize("command", list(cli_main.COMMANDS))
def test_only_training_commands_tune_the_allocator(command, monkeypatch):
    calls = []
    monkeypatch.setattr(cli_main, "keep_freed_memory", lambda: calls.append(command))
    monkeypatch.setattr(cli_main, "build_parser", lambda commands: _Parser(command))
    assert cli_main.main([command]) == 0
    training = {"distill", "recover", "self-distill", "cache-teacher"}
    assert set(cli_main.TRAINING_COMMANDS) == training
    assert calls == ([command] if command in training else [])


class _Parser:
    """Stands in for the real parser (whose commands would need real inputs): the parsed command does nothing."""

    def __init__(self, command: str):
        self.command = command

    def parse_args(self, argv: list[str]) -> argparse.Namespace:
        return argparse.Namespace(command=self.command, _run=lambda args: 0)


@pytest.mark.slow
@glibc
def test_kept_memory_trains_the_same_student_bit_for_bit(tmp_path, shared_data):
    """`bitdistill distill` with the allocator tuned (the default) and with it left alone (the opt-out set):
    the students' safetensors are identical byte for byte."""
    tok = shared_data / "tokenizers" / "gpt2"
    (tmp_path / "train.txt").write_text((shared_data / "wikitext-2-raw-v1" / "wiki.train.prefix.raw").read_text()[:6000])
    teacher = tiny_gpt2_vocab_folder(tmp_path / "teacher", "llama", tok)
    env = _clean_env()
    files = []
    for name, extra in (("kept", {}), ("glibc", {OPT_OUT: "0"})):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "bitdistill.cli.main", "distill", "--teacher_model_name_or_path", str(teacher),
               "--train_files", str(tmp_path / "train.txt"), "--max_seq_length", "32",
               "--per_device_train_batch_size", "2", "--max_steps", "3", "--seed", "0", "--disable_tqdm", "true",
               "--attention_weight", "1", "--subln", "true", "--data_cache_dir", str(tmp_path / "cache"),
               "--output_dir", str(out)]
        proc = subprocess.run(cmd, cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        files.append((out / "student" / "model.safetensors").read_bytes())
    assert files[0] == files[1]
