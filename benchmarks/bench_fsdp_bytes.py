"""Bytes each FSDP2 rank communicates per training step: the plain all-gather against the ternary all-gather.

For a SmolLM2-135M-shaped student (the published config's shapes) the bytes are computed from the shapes with
:func:`bitdistill.fsdp.ternary.all_gather_bytes`; the same formula is checked against the bytes counted
(:class:`bitdistill.fsdp.ternary.CommCounter`) on two gloo ranks training a small Llama student for one step.
One step with ``reshard_after_forward=True`` gathers every parameter twice (forward, and again for the backward)
and reduce-scatters the gradients once; each rank receives each gathered tensor whole (a ring moves
``(world - 1) / world`` of it over each link) and sends its full gradients into the reduce-scatter.

    python benchmarks/bench_fsdp_bytes.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench

from bitdistill.fsdp.ternary import SUMMARY_BUCKETS, all_gather_bytes

MODES = {"plain float32": (False, 4), "plain bf16 params": (False, 2), "ternary, rest float32": (True, 4),
         "ternary, rest bf16": (True, 2)}


def smollm2_135m_config():
    """SmolLM2-135M's published architecture (HuggingFaceTB/SmolLM2-135M config.json)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       tie_word_embeddings=True)


def linear_shapes_and_rest(config) -> tuple[list[tuple[int, int]], int]:
    """``(out, in)`` of every linear layer that becomes BitLinear, and the count of the other parameters (meta)."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    shapes = [tuple(m.weight.shape) for m in linears]
    rest = sum(p.numel() for p in model.parameters()) - sum(o * i for o, i in shapes)
    return shapes, rest


def step_bytes(shapes, rest: int, ternary: bool, param_bytes: int, reduce_bytes: int = 4) -> dict[str, int]:
    """One step's bytes per rank: both all-gathers (received) and the gradient reduce-scatter (sent)."""
    gathers = 2 * all_gather_bytes(shapes, ternary=ternary, param_bytes=param_bytes, other_numel=rest)
    linear = 2 * all_gather_bytes(shapes, ternary=ternary, param_bytes=param_bytes)
    grads = (sum(o * i for o, i in shapes) + rest) * reduce_bytes
    return {"linear_gather": linear, "other_gather": gathers - linear, "all_gather": gathers,
            "reduce_scatter": grads, "step_total": gathers + grads}


def _rank(rank: int, world: int, init_file: str, out: str, ternary: bool, bf16: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from bitdistill.fsdp.shard import fully_shard_student
    from bitdistill.fsdp.ternary import CommCounter
    from bitdistill.models import tiny_model
    from bitdistill.nn.replace import replace_linear_with_bitlinear

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student = tiny_model("llama").train()
        replace_linear_with_bitlinear(student)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        fully_shard_student(student, mp_policy=mp, ternary_all_gather=ternary)
        ids = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(rank))
        counter = CommCounter()
        with counter.counting():
            student(input_ids=ids, labels=ids).loss.backward()
        if rank == 0:
            torch.save({"received": counter.received, "sent": counter.sent}, out)
    finally:
        dist.destroy_process_group()


def count_small(ternary: bool, bf16: bool) -> dict:
    """Bytes counted on rank 0 of two gloo ranks for one step of the tiny Llama student."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "counts.pt")
        mp.start_processes(_rank, args=(2, os.path.join(tmp, "init"), out, ternary, bf16), nprocs=2,
                           start_method="spawn")
        return torch.load(out, weights_only=True)


def main() -> None:
    from bitdistill.models import tiny_config

    bench = Bench("fsdp_bytes")
    command = "python benchmarks/bench_fsdp_bytes.py"
    shapes, rest = linear_shapes_and_rest(smollm2_135m_config())
    plain = step_bytes(shapes, rest, False, 4)
    for mode, (ternary, pbytes) in MODES.items():
        b = step_bytes(shapes, rest, ternary, pbytes)
        bench.add(model="SmolLM2-135M shapes", mode=mode, source="formula", **{k: v / 2**20 for k, v in b.items()},
                  linear_gather_vs_plain_fp32=plain["linear_gather"] / b["linear_gather"],
                  all_gather_vs_plain_fp32=plain["all_gather"] / b["all_gather"],
                  step_vs_plain_fp32=plain["step_total"] / b["step_total"], command=command, load_avg=os.getloadavg()[0])
    tiny_shapes, tiny_rest = linear_shapes_and_rest(tiny_config("llama"))
    for mode, (ternary, pbytes) in MODES.items():
        t0 = time.process_time()
        counted = count_small(ternary, pbytes == 2)
        want = step_bytes(tiny_shapes, tiny_rest, ternary, pbytes)
        got_gather = counted["received"]["all_gather"] + counted["received"].get("all_reduce", 0)
        bench.add(model="tiny Llama (hidden 64, 2 blocks), 2 gloo ranks", mode=mode, source="counted",
                  all_gather=got_gather / 2**20, reduce_scatter=counted["sent"]["reduce_scatter"] / 2**20,
                  formula_all_gather=want["all_gather"] / 2**20, counted_equals_formula=got_gather == want["all_gather"]
                  and counted["sent"]["reduce_scatter"] == want["reduce_scatter"], cpu_s=time.process_time() - t0,
                  command=command, load_avg=os.getloadavg()[0])
        print(bench.rows[-1], flush=True)
    bench.write(["model", "mode", "source", "linear_gather", "other_gather", "all_gather", "reduce_scatter",
                 "step_total", "linear_gather_vs_plain_fp32", "all_gather_vs_plain_fp32", "step_vs_plain_fp32",
                 "formula_all_gather", "counted_equals_formula"],
                title="FSDP2 bytes per rank and step: plain against ternary all-gather (MiB)",
                note=f"`{command}`. One step = forward all-gather + backward re-gather (reshard_after_forward) + one "
                     f"gradient reduce-scatter (float32). Ternary: 2-bit codes of each BitLinear weight plus one "
                     f"{SUMMARY_BUCKETS * 8}-byte exact absmean summary per weight and gather; embeddings and norms "
                     "stay plain. Counted rows: bytes rank 0's collectives moved (CommCounter), which must equal the "
                     "formula.")


if __name__ == "__main__":
    main()
