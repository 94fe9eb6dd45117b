"""Loads one model directory in vLLM (CPU build) and records greedy tokens and top-k logprobs.

    python tests/e2e/run_vllm.py MODEL_DIR --tp N --load-format auto|sharded_state --out RESULT.json

One process per engine: a vLLM engine does not give its memory and worker processes back
reliably, so the driver (e2e_whisper.py) starts this script once per load. Inputs are fixed
synthetic audio clips (seeded noise and tones), so every run sees the same prompts.
"""

import argparse
import json
import os
import sys

import numpy as np
from common import engine_args, top

PROMPT = "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"
TOP_K = 5
MAX_TOKENS = 8
SAMPLE_RATE = 16000


def clips():
    rng = np.random.default_rng(7)
    t = np.arange(int(1.5 * SAMPLE_RATE)) / SAMPLE_RATE
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1250 * t)
    noise = 0.1 * rng.standard_normal(int(2.5 * SAMPLE_RATE))
    chirp_t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    chirp = 0.4 * np.sin(2 * np.pi * (200 + 1800 * chirp_t) * chirp_t)
    return [x.astype(np.float32) for x in (tone, noise, chirp)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from vllm import LLM, SamplingParams

    llm = LLM(**engine_args(a.model, a.tp, a.load_format), limit_mm_per_prompt={"audio": 1})
    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_K, prompt_logprobs=TOP_K
    )
    # Bare arrays, already at 16 kHz: an (array, rate) tuple makes vLLM <= 0.13 resample with
    # librosa even at the target rate (librosa is not in the locks); 0.32 takes either.
    prompts = [{"prompt": PROMPT, "multi_modal_data": {"audio": c}} for c in clips()]
    outs = llm.generate(prompts, params)
    result = []
    for o in outs:
        c = o.outputs[0]
        result.append(
            {
                "prompt_token_ids": list(o.prompt_token_ids),
                "prompt_logprobs": [top(e) for e in (o.prompt_logprobs or [])],
                "token_ids": list(c.token_ids),
                "logprobs": [top(e) for e in (c.logprobs or [])],
            }
        )
    with open(a.out, "w") as f:
        json.dump({"model": a.model, "tp": a.tp, "load_format": a.load_format, "outputs": result}, f)
    print(f"run_vllm: {a.model} tp {a.tp} {a.load_format}: tokens {[r['token_ids'] for r in result]}", flush=True)
    # vLLM's engine processes can keep the interpreter from exiting; the result is on disk, and
    # the driver kills this process's group (common.run_group).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
