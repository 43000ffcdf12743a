"""Count issue 14's failure cases by class: run the reliability tests, group each case by its failure class.

Every case is a test (or one parametrization of a test) that asserts the exit status, the single stderr line
and the file system afterwards. This script runs them with pytest, reads the JUnit XML and writes one JSONL row
per class to ``benchmarks/results/reliability.jsonl`` and the table ``benchmarks/results/reliability.md``.

    python benchmarks/reliability_cases.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = ["tests/test_io.py", "tests/test_reliability.py", "tests/test_reliability_runs.py"]
# (class as issue 14 names it, test-name prefixes that belong to it); first match wins.
CLASSES = [
    ("data outside the output deleted or replaced",
     ("test_output_", "test_overwrite_", "test_second_run", "test_existing_output", "test_empty_folder_appearing",
      "test_dangling_symlink", "test_check_output_location")),
    ("corrupt weights accepted", ("test_corrupt_", "test_tensor_shared")),
    ("tracebacks instead of one line",
     ("test_truncated_", "test_invalid_config", "test_missing_local", "test_full_disk", "test_atomic_write_full_disk",
      "test_read_only", "test_eval_tokenizer", "test_interrupted", "test_teacher_cache_with_corrupt")),
    ("faults that block recovery",
     ("test_full_disk_during_a_checkpoint", "test_partial_checkpoint", "test_explicit_incomplete", "test_stale_",
      "test_signal_removes", "test_failure_leaves_nothing")),
    ("silent or vague (arguments checked before work starts)",
     ("test_distill_rejects", "test_self_distill_rejects", "test_cache_teacher_rejects")),
    ("permissions", ("test_outputs_have_umask", "test_success_renames", "test_atomic_write_text")),
    ("programming errors keep their traceback", ("test_programming_errors", "test_debug_keeps")),
    ("pickles and remote code refused (kept)", ("test_pickled_weights", "test_remote_code")),
]


def _class(name: str) -> str:
    for label, prefixes in CLASSES:
        if name.startswith(prefixes):
            return label
    return "other"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        started = time.time()
        subprocess.run([sys.executable, "-m", "pytest", *FILES, "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"],
                       cwd=REPO, check=False)
        wall = time.time() - started
        cases = ET.parse(xml).getroot().iter("testcase")
        rows: dict[str, dict] = {}
        for case in cases:
            name = case.get("name")
            label = _class(name)
            row = rows.setdefault(label, {"class": label, "cases": 0, "passed": 0, "failed": 0, "skipped": 0})
            row["cases"] += 1
            if case.find("skipped") is not None:
                row["skipped"] += 1
            elif case.find("failure") is not None or case.find("error") is not None:
                row["failed"] += 1
            else:
                row["passed"] += 1
    out = REPO / "benchmarks" / "results"
    meta = {"command": "python benchmarks/reliability_cases.py", "files": FILES, "wall_s": round(wall, 1),
            "load_1min": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ordered = [rows[label] for label, _ in CLASSES if label in rows] + ([rows["other"]] if "other" in rows else [])
    with open(out / "reliability.jsonl", "w") as f:
        for row in ordered:
            f.write(json.dumps({**row, **meta}) + "\n")
    lines = ["# Issue 14 failure classes: cases tried and results", "",
             f"`{meta['command']}` ({meta['time']}, {meta['wall_s']} s wall, load {meta['load_1min']:.1f}). "
             "Each case asserts the exit status, the single stderr line and the file system afterwards.", "",
             "| failure class | cases | passed | failed | skipped |", "|---|---|---|---|---|"]
    lines += [f"| {r['class']} | {r['cases']} | {r['passed']} | {r['failed']} | {r['skipped']} |" for r in ordered]
    total = {k: sum(r[k] for r in ordered) for k in ("cases", "passed", "failed", "skipped")}
    lines.append(f"| **all** | {total['cases']} | {total['passed']} | {total['failed']} | {total['skipped']} |")
    (out / "reliability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if total["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
