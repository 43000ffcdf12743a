"""Probe: block-loss design on SmolLM2-135M, first 3 decoder blocks (held-out chain error after reconstruction).

Calibration: the first 16 x 512 tokens of wiki.train.prefix.raw's first 200,000 characters; held-out: the last
4 x 512 tokens of wiki.valid.raw (training text, never wiki.test.raw). Prints one JSON line: the student's
hidden-state error after 3 blocks, on its own inputs, by each metric (``mse``: total squared error / total
squared target; ``token``: per-token relative squared error, averaged; ``*_no_pos0`` without the first
position; ``pos0_share_of_sq_target``: the first position's share of the target's squared norm), and the per-block
records. Usage (from the repo root; one configuration per process)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/probe_recovery_loss.py '{"init": "gptq", "steps": 15, "loss": "token"}'
"""
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import SHARED, TOKENIZER, gguf_file
from transformers import AutoTokenizer

from bitdistill.convert import load_causal_lm
from bitdistill.nn.replace import replace_linear_with_bitlinear
from bitdistill.recover.blockwise import BlockwiseConfig, block_loss, reconstruct_blocks_in_place
from bitdistill.recover.layers import capture_layer_call, decoder_layers, layer_output

torch.set_num_threads(2)
W = str(SHARED / "wikitext-2-raw-v1") + "/"
tok = AutoTokenizer.from_pretrained(TOKENIZER)
g = gguf_file()
teacher = load_causal_lm(str(g.parent), gguf_file=g.name).eval()
teacher.requires_grad_(False)
S = 512
tr = tok(open(W + "wiki.train.prefix.raw").read()[:200000], return_tensors="pt").input_ids[0]
va = tok(open(W + "wiki.valid.raw").read()[-60000:], return_tensors="pt").input_ids[0]
cal = tr[: 16 * S].reshape(16, S)
val = va[-4 * S:].reshape(4, S)
NB = 3
c = json.loads(sys.argv[1])
st = copy.deepcopy(teacher)
replace_linear_with_bitlinear(st)
st.eval()
t0 = time.process_time()
rep = reconstruct_blocks_in_place(st, teacher, cal, BlockwiseConfig(**c), val_ids=val, progress=False, max_blocks=NB)
cpu = time.process_time() - t0
_, tl = decoder_layers(teacher)
_, sl = decoder_layers(st)
with torch.no_grad():
    ht, call = capture_layer_call(teacher, val)
    hs = ht.clone()
    for i in range(NB):
        ht2 = layer_output(tl[i], ht, call)
        hs = layer_output(sl[i], hs, call)
        ht = ht2
    # errors of the student's chain (own inputs) after NB blocks, by every metric, plus excluding position 0
    out = {k: block_loss(k, hs, ht, ht).item() for k in ("mse", "token")}
    out["token_no_pos0"] = block_loss("token", hs[:, 1:], ht[:, 1:], ht[:, 1:]).item()
    out["mse_no_pos0"] = block_loss("mse", hs[:, 1:], ht[:, 1:], ht[:, 1:]).item()
    out["pos0_share_of_sq_target"] = (ht[:, 0].pow(2).sum() / ht.pow(2).sum()).item()
print(json.dumps({"cfg": c, "cpu_s": round(cpu, 1), "chain_errors_after_3_blocks": out,
                  "blocks": [{k: b[k] for k in ("val_before", "val_after", "init_error", "absmean_error", "steps")} for b in rep.blocks]}), flush=True)
