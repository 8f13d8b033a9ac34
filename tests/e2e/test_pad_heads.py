"""SmolLM2-135M (9 heads, 3 KV heads) at tp 2 with `tpconv convert --pad-heads`: transformers' greedy tokens
and logits on the real-model prompts, and the numerics check passes."""
import json
import subprocess
import sys

import pytest
import torch

from tests.e2e.prompts import LOGIT_ATOL, NEW_TOKENS, PROMPTS
from tests.e2e.server import ROOT

pytestmark = pytest.mark.slow

# In a process of its own: the package's shared multi-rank LLMs hold this process's process group.
RUN = """
import json, sys
from runtime.api import LLM, SamplingParams
out = {}
with LLM(sys.argv[1], device="cpu") as llm:
    for prompt, ids in json.loads(sys.argv[2]).items():
        gen = llm.generate(ids, SamplingParams(temperature=0, max_tokens=int(sys.argv[3]), ignore_eos=True))
        out[prompt] = {"greedy": gen[0].outputs[0].token_ids, "logits": llm.prompt_logits(ids)[-1].tolist()}
print(json.dumps(out))
"""


def test_padded_heads_at_tp2_give_the_reference_tokens(smollm2, reference, tmp_path):
    ws = tmp_path / "ws"
    conv = subprocess.run([sys.executable, "-m", "converter", "convert", str(smollm2), "-o", str(ws), "--tp", "2",
                           "--pad-heads"], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert conv.returncode == 0, conv.stderr
    check = subprocess.run([sys.executable, "-m", "converter", "verify", "--numerics", str(ws)],
                           capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert check.returncode == 0 and "numerics OK" in check.stdout, check.stderr
    prompts = {p: reference[p][0] for p in PROMPTS}
    run = subprocess.run([sys.executable, "-c", RUN, str(ws), json.dumps(prompts), str(NEW_TOKENS)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    for p in PROMPTS:
        _, greedy, logits = reference[p]
        assert got[p]["greedy"] == greedy, p
        torch.testing.assert_close(torch.tensor(got[p]["logits"]), logits, atol=LOGIT_ATOL, rtol=0)
