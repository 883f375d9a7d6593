import subprocess, sys

CODE = """
import sys, tempfile, torch
sys.path.insert(0, "tests")
import mii.kernels.dispatch as D
from mii.kernels import torch_ref
only = "{only}"
if only != "all":
    keep = set(only.split("+"))
    if "norm" not in keep:
        D.rms_norm = lambda x, w, e, r=None: torch_ref.rms_norm_ref(x, w, e, r)
        D.silu_and_mul = torch_ref.silu_and_mul_ref
    if "rope" not in keep:
        D.rope_kv_write = torch_ref.rope_kv_write_ref
    if "attn" not in keep:
        orig = D.paged_attention
        def pa(q, kc, vc, bt, qsl, sl, scale, *, max_query_len):
            if max_query_len == 1 and "decode" in keep:
                return orig(q, kc, vc, bt, qsl, sl, scale, max_query_len=1)
            return torch_ref.paged_attention_ref(q, kc, vc, bt, qsl, sl, scale)
        D.paged_attention = pa
    elif "decode" not in keep:
        orig = D.paged_attention
        def pa(q, kc, vc, bt, qsl, sl, scale, *, max_query_len):
            if max_query_len == 1:
                return torch_ref.paged_attention_ref(q, kc, vc, bt, qsl, sl, scale)
            return orig(q, kc, vc, bt, qsl, sl, scale, max_query_len=max_query_len)
        D.paged_attention = pa
    if "contig" in keep:
        orig2 = D.paged_attention
        D.paged_attention = lambda q, *a, **k: orig2(q.contiguous(), *a, **k)
from tiny_models import build_tiny_model, mixed_prompts
from mii.engine.config import EngineConfig, SchedulerConfig
from mii.engine.engine import LLMEngine
from mii.engine.sampling_params import SamplingParams
d = build_tiny_model("{arch}", tempfile.mkdtemp())
eng = LLMEngine(EngineConfig(model=d, device="cuda", dtype="float32", enforce_eager=True, scheduler=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8)))
for rep in range(3):
    for i, p in enumerate(mixed_prompts(3, (5, 40, 1), seed=1)):
        eng.add_request(f"{{rep}}-{{i}}", p, SamplingParams(max_new_tokens=4, min_new_tokens=4))
    out = []
    while eng.has_unfinished_requests():
        out += [o.token_ids[0] for o in eng.step()]
    torch.cuda.synchronize()
print("OK", out)
"""

for arch in ["llama3"]:
    for only in ["none", "norm", "rope", "decode", "attn", "attn+contig", "all"]:
        r = subprocess.run([sys.executable, "-c", CODE.format(only=only, arch=arch)],
                           capture_output=True, text=True, timeout=120)
        lines = [l for l in (r.stdout + r.stderr).splitlines() if "Writing" not in l]
        print(f"{arch:8} {only:12} rc={r.returncode} {lines[-1][:150] if lines else ''}", flush=True)
