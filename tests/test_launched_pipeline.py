"""`mii.pipeline` under a launcher: `torchrun --nproc_per_node 2` (as `deepspeed --num_gpus
2` sets the same WORLD_SIZE, RANK, LOCAL_RANK) makes the two processes one tensor-parallel
group of two ranks on the CPU (gloo): rank 0 returns what one process alone returns, rank 1
returns None, or the same responses with `all_rank_output=True`; no process spawns ranks of
its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mii

pytestmark = pytest.mark.timeout(120)
TORCHRUN = Path(sys.executable).with_name("torchrun")
PROMPTS = ["hello there", "a b c"]
GREEDY = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)

SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing, os, sys
    import mii

    path, out, call = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    result = {"world": os.environ["WORLD_SIZE"]}
    for all_rank_output in (False, True):
        pipe = mii.pipeline(path, max_num_batched_tokens=32, all_rank_output=all_rank_output)
        result["children"] = len(multiprocessing.active_children())
        responses = pipe(call["prompts"], **call["options"])
        result[str(all_rank_output)] = responses and [r.token_ids for r in responses]
        pipe.destroy()
    with open(os.path.join(out, "rank" + os.environ["RANK"] + ".json"), "w") as f:
        json.dump(result, f)
    """
)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_torchrun_processes_form_one_group(tiny_model, tmp_path):
    path = tiny_model("llama")
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    run = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script), path,
         str(tmp_path), json.dumps({"prompts": PROMPTS, "options": GREEDY})],
        capture_output=True, text=True, timeout=110, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    pipe = mii.pipeline(path, max_num_batched_tokens=32, tensor_parallel=1)
    try:
        alone = [r.token_ids for r in pipe(PROMPTS, **GREEDY)]
    finally:
        pipe.destroy()
    assert rank0["False"] == rank0["True"] == alone
    assert rank1["False"] is None  # only rank 0 answers ...
    assert rank1["True"] == alone  # ... unless all_rank_output
    assert rank0["children"] == rank1["children"] == 0  # one group of 2, not 2 x 2
