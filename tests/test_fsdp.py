"""FSDP2 over BitNet students on two CPU gloo ranks, against one process; the ternary all-gather; saving.

The multi-process tests spawn two ranks (``torch.multiprocessing``, gloo, a file store in ``tmp_path``) that run
:mod:`fsdp_ranks`; each takes about 30 s of two cores, so they are ``slow`` (CI runs them: ``-m "not gpu"``).

Tolerances (float32, lr 1e-3, 3 AdamW steps). The forward on each rank sees bit-identical gathered weights;
only the gradient reduction order differs (two half-batch sums averaged instead of one sum), so losses agree to
1e-5 relative, first-step gradients to 1e-5 of each tensor's largest entry, and weights to 1e-5 absolute per step
(1% of one step; AdamW's first steps are close to ``lr * sign(grad)``, so a gradient within rounding of 0
can move a weight by up to ``lr`` and is the one case such a test could flake on; none here). bf16 parameters with
float32 reduction are compared with a one-process emulation of the same policy (bf16 copy computes, float32
master weights step): losses to 2e-3 relative, gradients to 5e-2 of each tensor's largest entry (two bf16 half
sums against one), weights by at most 2 * lr per step (a near-zero gradient whose sign the bf16 rounding flips
moves a weight by up to 2 * lr) and by 0.05 * lr per step on average.
"""

from __future__ import annotations

import math

import fsdp_ranks
import pytest
import torch

from bitdistill.errors import UserError
from bitdistill.fsdp.shard import check_full_state_dict_fits, decoder_block_class, full_state_dict_bytes
from bitdistill.fsdp.ternary import (
    SUMMARY_BUCKETS,
    CommCounter,
    PackedTernaryWeight,
    TernaryLatentWeight,
    _pack_rows,
    abs_sum_summary,
    all_gather_bytes,
    gamma_from_summary,
    ternary_codes_exact,
    use_ternary_all_gather,
)
from bitdistill.models import tiny_model
from bitdistill.nn.bitlinear import BitLinear
from bitdistill.nn.replace import load_student, replace_linear_with_bitlinear
from bitdistill.quant.reference import weight_quant


def _linear_shapes(model) -> list[tuple[int, int]]:
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, BitLinear)]


def _reference(mode: str) -> dict:
    torch.set_num_threads(1)
    student, teacher, batches = fsdp_ranks.build()
    if mode == "ternary":
        use_ternary_all_gather(student, world_size=2)
    if mode == "bf16":
        return fsdp_ranks.train_bf16_reference(student, teacher, batches) | {"model": student}
    return fsdp_ranks.train(student, teacher, batches) | {"model": student}


def _compare(got: dict, want: dict, *, loss_rtol: float, grad_rel: float, weight_atol: float,
             weight_mean_atol: float | None = None) -> None:
    """``weight_atol`` and ``weight_mean_atol`` bound the largest and the mean absolute weight difference per step
    taken (the bound after step ``s`` is ``(s + 1)`` times it)."""
    assert len(got["losses"]) == len(want["losses"]) == fsdp_ranks.STEPS
    for a, b in zip(got["losses"], want["losses"], strict=True):
        assert math.isclose(a, b, rel_tol=loss_rtol), (got["losses"], want["losses"])
    assert got["grads"].keys() == want["grads"].keys()
    for name, g in want["grads"].items():
        scale = g.abs().max().clamp(min=1e-12)
        assert (got["grads"][name] - g).abs().max() <= grad_rel * scale, name
    for step, (w_got, w_want) in enumerate(zip(got["weights"], want["weights"], strict=True)):
        for name, w in w_want.items():
            diff = (w_got[name] - w).abs()
            assert diff.max() <= weight_atol * (step + 1), (step, name)
            if weight_mean_atol is not None:
                assert diff.mean() <= weight_mean_atol * (step + 1), (step, name)


@pytest.mark.slow
def test_fsdp2_float32_matches_one_process_and_saves_a_student(tmp_path):
    got = fsdp_ranks.spawn("fp32", tmp_path)
    want = _reference("fp32")
    _compare(got, want, loss_rtol=1e-5, grad_rel=1e-5, weight_atol=1e-5)
    assert got["sharded_dtypes"] == got["forward_weight_dtypes"] == ["torch.float32"]
    # the full state dict went into a normal student folder: load_student reads it, pack packs it
    loaded = load_student(got["saved"])
    final = want["weights"][-1]
    for name, p in loaded.named_parameters():
        assert torch.allclose(p.detach(), final[name], atol=1e-5, rtol=0), name
    assert sum(isinstance(m, BitLinear) and m.rms_norm is not None for m in loaded.modules()) == 4  # SubLN kept
    # the Trainer path's rank-0 copy (unsharded_student) holds the same tensors
    assert got["gathered"].keys() == loaded.state_dict().keys()
    for name, t in loaded.state_dict().items():
        assert torch.equal(got["gathered"][name], t), name
    from bitdistill.export.folder import pack_pretrained

    result = pack_pretrained(got["saved"], tmp_path / "packed", dtype="float32")
    assert (tmp_path / "packed" / "config.json").is_file() and result.report is not None


@pytest.mark.slow
def test_fsdp2_bf16_params_fp32_reduce(tmp_path):
    got = fsdp_ranks.spawn("bf16", tmp_path)
    want = _reference("bf16")
    assert got["forward_weight_dtypes"] == ["torch.bfloat16"]  # gathered and computed in bf16
    assert got["sharded_dtypes"] == ["torch.float32"]  # sharded master weights and optimizer stay float32
    _compare(got, want, loss_rtol=2e-3, grad_rel=5e-2, weight_atol=2 * fsdp_ranks.LR,
             weight_mean_atol=0.05 * fsdp_ranks.LR)
    assert got["comm"]["received"]["all_gather"] == all_gather_bytes(
        _linear_shapes(want["model"]), ternary=False, param_bytes=2,
        other_numel=_other_numel(want["model"])) * 2  # forward and the backward's re-gather


def _other_numel(model) -> int:
    linear = {id(m.weight) for m in model.modules() if isinstance(m, BitLinear)}
    return sum(p.numel() for p in model.parameters() if id(p) not in linear)


@pytest.mark.slow
def test_ternary_all_gather_is_bit_exact_and_gathers_8x_fewer_bytes(tmp_path):
    got = fsdp_ranks.spawn("ternary", tmp_path)
    want = _reference("ternary")
    # every rank's gathered codes and gamma are the unsharded computation's, bit for bit
    assert got["codes"].keys() == want["codes"].keys() and len(want["codes"]) == 14
    for name, (codes, gamma) in want["codes"].items():
        assert torch.equal(got["codes"][name][0], codes), name
        assert torch.equal(got["codes"][name][1], gamma), name
    _compare(got, want, loss_rtol=1e-5, grad_rel=1e-5, weight_atol=1e-5)
    # bytes: counted on rank 0 in the first step (forward gather + backward re-gather) against the formula
    model = want["model"]
    shapes, other = _linear_shapes(model), _other_numel(model)
    comm = got["comm"]["received"]
    assert comm["all_gather"] == 2 * (all_gather_bytes(shapes, ternary=True, other_numel=other)
                                      - len(shapes) * SUMMARY_BUCKETS * 8)
    assert comm["all_reduce"] == 2 * len(shapes) * SUMMARY_BUCKETS * 8
    plain_linear = 2 * 4 * sum(o * i for o, i in shapes)
    ternary_linear = 2 * (sum(o * i for o, i in shapes) // 4 + len(shapes) * SUMMARY_BUCKETS * 8)
    assert plain_linear >= 8 * ternary_linear
    loaded = load_student(got["saved"])
    for name, p in loaded.named_parameters():
        assert torch.allclose(p.detach(), want["weights"][-1][name], atol=1e-5, rtol=0), name


# ---- the pieces, in one process -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 12), (37, 64), (1, 4)])
def test_abs_sum_summary_is_exact_and_order_free(shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen) * torch.logspace(-30, 3, shape[1])  # many exponents
    w[0, 0] = 0.0
    whole = abs_sum_summary(w)
    assert whole.shape == (SUMMARY_BUCKETS,) and whole.dtype == torch.int64
    parts = sum(abs_sum_summary(chunk) for chunk in w.flatten()[torch.randperm(w.numel(), generator=gen)].split(5))
    assert torch.equal(parts, whole)
    # the integers are the exact sum: compare with Python's exactly rounded float sum
    exact = math.fsum(abs(v) for v in w.flatten().tolist())
    total = sum(int(b) * 2.0 ** (8 * i - 172) for i, b in enumerate(whole.tolist()))
    assert math.isclose(total, exact, rel_tol=1e-15)
    gamma = gamma_from_summary(whole, w.numel())
    assert gamma.dtype == torch.float32 and gamma.dim() == 0
    assert float(gamma) == float(torch.tensor(max(exact / w.numel(), 1e-5), dtype=torch.float32))


def test_exact_gamma_is_within_an_ulp_of_the_default_and_codes_follow_the_reference():
    for seed in range(5):
        w = torch.randn(96, 80, generator=torch.Generator().manual_seed(seed)) * 0.02
        exact = gamma_from_summary(abs_sum_summary(w), w.numel())
        codes, gamma = weight_quant(w)
        assert abs(float(exact) - float(gamma)) <= 2 * torch.finfo(torch.float32).eps * float(gamma)
        # with the same gamma the codes are the reference's formula, ties to even included
        assert torch.equal(ternary_codes_exact(w, gamma), codes)
    ties = torch.tensor([[0.5, -0.5, 1.5, -1.5, 0.49999997, 2.5, 0.0, 1.0]])
    assert ternary_codes_exact(ties, torch.tensor(1.0)).tolist() == [[0, 0, 1, -1, 0, 1, 0, 1]]


def test_packed_weight_round_trips_and_bitlinear_computes_the_same():
    torch.manual_seed(0)
    lin = BitLinear(12, 8, bias=True)
    x = torch.randn(3, 5, 12)
    latent = TernaryLatentWeight(lin.weight.detach().clone())
    codes, gamma = latent.ternary_codes_and_scale()
    packed = PackedTernaryWeight(_pack_rows(codes), gamma, torch.float32)
    assert packed.shape == lin.weight.shape and packed.dtype == torch.float32
    assert torch.equal(packed.ternary_codes_and_scale()[0], codes)
    outs = []
    for w in (latent, packed):
        m = BitLinear(12, 8, bias=True)
        m.weight = torch.nn.Parameter(w)
        m.bias = torch.nn.Parameter(lin.bias.detach().clone())
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(packed.dequantize(), codes.float() * gamma)


def test_use_ternary_all_gather_keeps_what_it_cannot_pack():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="no eligible BitLinear"):
        use_ternary_all_gather(model, world_size=2)
    replace_linear_with_bitlinear(model)
    kept = use_ternary_all_gather(model, world_size=64)  # k/v have 32 rows: uneven over 64 ranks
    assert sorted(kept) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kv"]
    assert all("evenly" in why for why in kept.values())
    model = tiny_model("llama")
    replace_linear_with_bitlinear(model)
    assert use_ternary_all_gather(model, world_size=2) == {}
    assert all(isinstance(m.weight, TernaryLatentWeight) for m in model.modules() if isinstance(m, BitLinear))
    ids = torch.randint(0, 256, (2, 8))
    model(input_ids=ids).logits.sum().backward()  # trains in one process too


def test_all_gather_bytes_smollm2_shaped_is_over_8x_smaller():
    h, inter, layers, kv = 576, 1536, 30, 192
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)] * layers
    plain = all_gather_bytes(shapes, ternary=False)
    ternary = all_gather_bytes(shapes, ternary=True)
    assert plain / ternary > 15  # 16x for codes alone, a little less with the 280-byte summaries


def test_comm_counter_restores_torch_distributed():
    import torch.distributed as dist

    before = dist.all_reduce
    with CommCounter().counting():
        assert dist.all_reduce is not before
    assert dist.all_reduce is before


def test_decoder_block_class_and_state_dict_check():
    model = tiny_model("phi3")
    assert decoder_block_class(model) == "Phi3DecoderLayer"
    assert full_state_dict_bytes(model) >= sum(p.numel() * 4 for p in model.parameters())
    check_full_state_dict_fits(model, available=10 * full_state_dict_bytes(model))
    with pytest.raises(UserError, match=r"full state dict .* rank 0") as err:
        check_full_state_dict_fits(model, available=1000)
    assert "\n" not in str(err.value)


# ---- the Trainer path (accelerate FSDP2) ----------------------------------------------------------------------

def _training_args(tmp_path, **fsdp_config):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "o"), fsdp=True, fsdp_config={"version": 2, **fsdp_config},
                             report_to=[])


def test_prepare_student_for_fsdp_checks_before_training(tmp_path):
    from transformers import TrainingArguments

    from bitdistill.fsdp.training import is_sharded, prepare_student_for_fsdp, unsharded_student

    student = tiny_model("qwen2")
    replace_linear_with_bitlinear(student)
    prepare_student_for_fsdp(TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[]), student, available=0)
    prepare_student_for_fsdp(_training_args(tmp_path), student)  # _no_split_modules names Qwen2DecoderLayer
    prepare_student_for_fsdp(_training_args(tmp_path, transformer_layer_cls_to_wrap=["Qwen2DecoderLayer"]), student)
    for config, match in (({"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}, "Qwen2DecoderLayer"),
                          ({"version": 1}, "FSDP2 only")):
        with pytest.raises(UserError, match=match) as err:
            prepare_student_for_fsdp(_training_args(tmp_path, **config), student)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="full state dict"):
        prepare_student_for_fsdp(_training_args(tmp_path), student, available=1000)
    assert not any(isinstance(m.weight, TernaryLatentWeight) for m in student.modules() if isinstance(m, BitLinear))
    prepare_student_for_fsdp(_training_args(tmp_path, bitdistill_ternary_all_gather=True), student)
    assert all(isinstance(m.weight, TernaryLatentWeight) for m in student.modules() if isinstance(m, BitLinear))
    assert not is_sharded(student) and unsharded_student(student) is student


def test_distill_with_fsdp_that_could_not_save_fails_before_training(tmp_path, shared_data, monkeypatch, capsys):
    from bitdistill.cli.main import main
    from bitdistill.fsdp import shard

    monkeypatch.setattr(shard, "available_host_bytes", lambda: 1000)
    train = tmp_path / "train.txt"
    train.write_text((shared_data / "wikitext-2-raw-v1" / "wiki.train.prefix.raw").read_text()[:3000])
    out = tmp_path / "run"
    rc = main(["distill", "--teacher_model_name_or_path", "tiny:llama", "--train_files", str(train),
               "--max_seq_length", "32", "--max_steps", "2", "--output_dir", str(out), "--fsdp", "full_shard",
               "--fsdp_config", '{"version": 2}', "--disable_tqdm", "true", "--report_to", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "full state dict" in err and "rank 0" in err
    assert not list(out.glob("checkpoint-*")) and not (out / "student").exists()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="accelerate turns FSDP on only for GPU runs; needs 2 GPUs")
@pytest.mark.parametrize("ternary", [False, True])
def test_distill_under_accelerate_fsdp2_two_gpus(tmp_path, shared_data, ternary):
    """``bitdistill distill`` under ``torchrun --nproc_per_node 2`` with an FSDP2 config (SubLN, the attention
    relation loss, bf16): it trains, saves a full student folder that ``load_student`` and ``pack`` accept."""
    import json
    import subprocess
    import sys

    from run_utils import free_port

    from bitdistill.export.folder import pack_pretrained

    train = tmp_path / "train.txt"
    train.write_text((shared_data / "wikitext-2-raw-v1" / "wiki.train.prefix.raw").read_text()[:6000])
    out = tmp_path / "run"
    config = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "state_dict_type": "FULL_STATE_DICT",
              "bitdistill_ternary_all_gather": ternary}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "bitdistill.cli.main", "distill", "--teacher_model_name_or_path", "tiny:llama",
           "--train_files", str(train), "--max_seq_length", "32", "--per_device_train_batch_size", "2",
           "--max_steps", "3", "--subln", "true", "--attention_weight", "1.0", "--bf16", "true",
           "--fsdp", "full_shard", "--fsdp_config", json.dumps(config), "--output_dir", str(out),
           "--disable_tqdm", "true", "--report_to", "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    student = load_student(out / "student")
    assert sum(isinstance(m, BitLinear) and m.rms_norm is not None for m in student.modules()) == 4
    assert all(torch.isfinite(p).all() for p in student.parameters())
    pack_pretrained(out / "student", tmp_path / "packed")


def test_one_rank_shard_save_and_gather_a_tied_qwen2_student(tmp_path):
    """In this process (a one-rank gloo group): a tied-embedding Qwen2 student with SubLN sharded per block, one
    step, then ``save_sharded_student`` and ``unsharded_student`` give what the unsharded model holds."""
    import torch.distributed as dist

    from bitdistill.fsdp.shard import fully_shard_student, save_sharded_student
    from bitdistill.fsdp.training import is_sharded, unsharded_student
    from bitdistill.nn.subln import insert_subln

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        student = tiny_model("qwen2").train()
        replace_linear_with_bitlinear(student)
        insert_subln(student, init="ones")
        fully_shard_student(student)
        assert is_sharded(student)
        ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
        student(input_ids=ids, labels=ids).loss.backward()
        torch.optim.SGD(student.parameters(), lr=0.1).step()
        want = {n: p.full_tensor().detach().clone() for n, p in student.named_parameters()}
        out = save_sharded_student(student, tmp_path / "student")
        gathered = unsharded_student(student)
    finally:
        dist.destroy_process_group()
    loaded = load_student(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    for model in (loaded, gathered):
        got = dict(model.named_parameters())
        assert got.keys() == want.keys()
        for name, t in want.items():
            assert torch.equal(got[name].detach(), t), name
    assert torch.equal(gathered(input_ids=ids).logits, loaded(input_ids=ids).logits)
    with pytest.raises(UserError, match="no bitdistill marker"):
        save_sharded_student(tiny_model("qwen2"), tmp_path / "plain")
    with pytest.raises(FileExistsError, match="overwrite"):  # refused before the gather (no collective is entered)
        save_sharded_student(loaded, out)
