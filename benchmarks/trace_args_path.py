"""The path of the distill arguments from the CLI to the loss, measured on a tiny run.

(a) stack: the bitdistill frames on the call stack when the first loss function runs (cli.main down to the loss;
    consecutive frames of one module collapsed), with any module that appears twice on it and every edge where a
    lower layer's frame calls (directly or through transformers) a higher layer's frame.
(b) fan-out: the bitdistill modules each orchestrating function (the run functions) calls directly, in order over the
    whole run (consecutive calls into one module collapsed), and how often each module is re-entered.
(c) calls: how often the loading, tokenizing, student-building and saving functions ran.

Usage (from the repository root; a tiny Llama, the first 12,000 characters of WikiText-2's training text)::

    python benchmarks/trace_args_path.py OUT_DIR distill|recover

Its output for main and for the engine branch is in docs/architecture.md (The path of the distill arguments).
"""
import itertools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from test_layering import LAYERS  # noqa: E402

ORCHESTRATORS = {"run_distillation", "distill_student", "run_trainer", "run_staged_recovery", "_e2e_stage", "_kd_stage"}
COUNTED = {"load_teacher", "load_tokenizer", "build_blocks", "token_blocks", "tokenize_text", "prepare_student",
           "load_model", "run_distillation", "distill_student", "save_student", "_save_student", "strided_perplexity",
           "held_out_loss"}
counts: dict[str, int] = {}
LOSS_FUNCS = {"logits_distillation_loss", "hidden_state_loss", "attention_relation_loss", "cross_entropy_loss"}


def layer(mod):
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(mod == p or mod.startswith(p + ".") for p in prefixes):
            return i
    return None


out, cmd = Path(sys.argv[1]), sys.argv[2]
out.mkdir(parents=True, exist_ok=True)
text = out / "train.txt"
text.write_text((REPO.parent / "shared" / "data" / "wikitext-2-raw-v1" / "wiki.train.prefix.raw").read_text()[:12000])
stack = None
fanout: dict[str, list[str]] = {}


def mod_of(frame):
    return frame.f_globals.get("__name__", "")


def prof(frame, event, arg):
    global stack
    if event != "call":
        return
    mod = mod_of(frame)
    if not mod.startswith("bitdistill"):
        return
    if frame.f_code.co_name in COUNTED:
        key = f"{mod}.{frame.f_code.co_name}"
        counts[key] = counts.get(key, 0) + 1
    caller = frame.f_back
    if caller is not None and caller.f_code.co_name in ORCHESTRATORS and mod_of(caller).startswith("bitdistill"):
        seq = fanout.setdefault(f"{mod_of(caller)}.{caller.f_code.co_name}", [])
        if mod != mod_of(caller) and (not seq or seq[-1] != mod):
            seq.append(mod)
    if stack is None and frame.f_code.co_name in LOSS_FUNCS:
        frames, f = [], frame
        while f is not None:
            if mod_of(f).startswith("bitdistill"):
                frames.append((mod_of(f), f.f_code.co_name))
            f = f.f_back
        stack = frames[::-1]


from bitdistill.cli.main import main  # noqa: E402

common = ["--teacher_model_name_or_path", "tiny:llama", "--train_files", str(text),
          "--max_seq_length", "32", "--data_cache_dir", "none", "--report_to", "none", "--disable_tqdm", "true",
          "--save_strategy", "no", "--output_dir", str(out / "run")]
if cmd == "distill":
    argv = ["distill", *common, "--max_steps", "2"]
else:
    argv = ["recover", *common, "--time_budget", "40s", "--block_steps", "2", "--calibration_tokens", "256",
            "--calibration_seq_length", "32", "--held_out_tokens", "128", "--block_micro_batch", "4",
            "--block_fraction", "0.5", "--context_fraction", "0.25", "--context_length", "64"]
sys.setprofile(prof)
rc = main(argv)
sys.setprofile(None)
collapsed = []
for m, fn in stack:
    if not collapsed or collapsed[-1][0] != m:
        collapsed.append((m, [fn]))
    elif fn not in collapsed[-1][1]:
        collapsed[-1][1].append(fn)
mods = [m for m, _ in collapsed]
upward = [f"{a} -> {b}" for (a, _), (b, _) in itertools.pairwise(collapsed)
          if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
report = {"command": cmd, "rc": rc,
          "stack_at_loss": [f"{m}: {' > '.join(f)}" for m, f in collapsed],
          "stack_modules": len(set(mods)), "stack_repeated": sorted(m for m in set(mods) if mods.count(m) > 1),
          "stack_upward_edges": upward, "calls": counts, "fanout": {}}
for orch, seq in fanout.items():
    re = {m: seq.count(m) - 1 for m in dict.fromkeys(seq) if seq.count(m) > 1}
    report["fanout"][orch] = {"calls_into": len(set(seq)), "sequence_length": len(seq), "reentries": re,
                              "reentries_total": sum(re.values()), "sequence": seq}
print("TRACE " + json.dumps(report))
