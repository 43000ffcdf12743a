"""The console script: only the chosen subcommand is imported, one flag spelling, cache-teacher's own flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bitdistill.cli.main import COMMANDS, build_parser, main

HEAVY = ("torch", "transformers", "bitdistill.distill", "bitdistill.nn")


def _modules_after(argv: list[str]) -> tuple[set[str], str]:
    code = ("import sys\nfrom bitdistill.cli.main import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('MODULES', ' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("MODULES "))
    return set(line.split()[1:]), out


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["convert", "--help"], ["pack", "--help"]])
def test_version_and_light_help_import_no_torch(argv):
    modules, out = _modules_after(argv)
    assert not [m for m in modules if m.split(".")[0] in ("torch", "transformers") or m in HEAVY]
    if argv == ["--version"]:
        assert "bitdistill 0" in out
    if argv == ["--help"]:
        assert all(name in out for name in COMMANDS)
    chosen = [m for m in modules if m.startswith("bitdistill.cli.") and m not in ("bitdistill.cli.main",)]
    assert chosen == ([f"bitdistill.cli.{argv[0]}"] if argv[0] in COMMANDS else [])


def test_gguf_file_has_one_spelling_and_the_dashed_alias_still_parses():
    parser = build_parser(["convert", "pack", "eval"])
    for command in ("convert", "pack", "eval"):
        argv = [command, "src", "out"] if command != "eval" else [command, "model"]
        assert vars(parser.parse_args([*argv, "--gguf_file", "m.gguf"]))["gguf_file"] == "m.gguf"
        assert vars(parser.parse_args([*argv, "--gguf-file", "m.gguf"]))["gguf_file"] == "m.gguf"
    args = parser.parse_args(["pack", "s", "o", "--from-plain", "--max-shard-size", "1KB"])
    assert args.from_plain and args.max_shard_size == 1000


@pytest.mark.parametrize("command", ["convert", "pack", "eval", "distill", "self-distill"])
def test_help_lists_underscore_flags_only(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "gguf_file" in out
    assert "gguf-file" not in out and "from-plain" not in out and "--use-rms-norm" not in out


def test_cache_teacher_help_lists_only_what_it_uses(capsys):
    from bitdistill.cli.cache_teacher import USED_FIELDS

    with pytest.raises(SystemExit):
        main(["cache-teacher", "--help"])
    out = capsys.readouterr().out
    for flag in ("--teacher_model_name_or_path", "--teacher_gguf_file", "--train_files", "--cache_dir", "--top_k"):
        assert flag in out
    for unused in ("--student_model_name_or_path", "--subln", "--eval_files", "--validation_blocks",
                   "--freeze_embeddings", "--quant_warmup_steps"):
        assert unused not in out
    parser = build_parser(["cache-teacher"])
    dests = {a.dest for a in parser._subparsers._group_actions[0].choices["cache-teacher"]._actions}
    assert dests - {"help", "config"} == set(USED_FIELDS)


def test_training_commands_default_openmp_to_passive_waiting_before_torch_loads():
    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); from bitdistill.cli.main import main; "
            "rc = main(['recover', '--time_budget', 'nonsense', '--teacher_model_name_or_path', 'tiny:llama', "
            "'--train_files', 'missing.txt', '--output_dir', 'unused']); "
            "print(os.environ.get('OMP_WAIT_POLICY'), rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout.split()
    assert out == ["PASSIVE", "2"]
    kept = subprocess.run([sys.executable, "-c", code.replace("os.environ.pop('OMP_WAIT_POLICY', None)",
                                                              "os.environ['OMP_WAIT_POLICY'] = 'ACTIVE'")],
                          capture_output=True, text=True, timeout=300).stdout.split()
    assert kept == ["ACTIVE", "2"]
