"""Shared by the end-to-end scripts: the byte-level BPE alphabet of the tokenizers made here,
the re-randomization of every tensor, and running one vLLM engine as a process group."""

import os
import signal
import subprocess
import time
from pathlib import Path


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character table (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def rerandomize(model, seed: int) -> None:
    """Every float tensor drawn anew: HF init zeroes biases (and BART's final_logits_bias) and sets
    norms to one, which would hide a bias or a norm put in the wrong place."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if ("layer_norm" in name or "layernorm" in name) and name.endswith("weight"):
                t.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                t.copy_(0.1 * noise)
            elif "embed" in name or "shared" in name:
                t.copy_(0.5 * noise)
            else:  # linear [out, in] and conv [out, in, k]: scaled by the fan-in
                fan_in = 1
                for d in t.shape[1:]:
                    fan_in *= d
                t.copy_(noise / max(fan_in, 1) ** 0.5)


def engine_args(model, tp: int, load_format: str) -> dict:
    """The LLM() arguments every e2e load uses: fp32 and eager (so the HF and sharded loads run the
    same kernels), a short context, greedy-friendly batch limits, and the multiprocessing backend
    for tp > 1 (the CPU build needs it)."""
    args = dict(
        model=str(model),
        tokenizer=str(model),
        load_format=load_format,
        tensor_parallel_size=tp,
        dtype="float32",
        enforce_eager=True,
        max_model_len=64,
        max_num_seqs=4,
        # Whisper needs room for the 1500 encoder positions of one clip in a batch.
        max_num_batched_tokens=2048,
        seed=0,
    )
    if tp > 1:
        args["distributed_executor_backend"] = "mp"
    return args


def top(entry):
    """{token id: logprob} of one position, as sorted [id, logprob] pairs (JSON keeps floats exact)."""
    if entry is None:
        return None
    return sorted([[int(k), float(v.logprob)] for k, v in entry.items()])


def run_group(cmd, log: Path, env=None, timeout=900) -> int:
    """Runs `cmd` in a session of its own with output to `log`, then kills that whole process
    group: vLLM's engine and worker processes outlive a driver that exits with os._exit, and each
    holds gigabytes. Returns the exit status (-9 after a timeout)."""
    t = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"  timeout after {timeout} s: {log}", flush=True)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    print(f"  ({' '.join(map(str, cmd[1:3]))} ... exit {p.returncode}, {time.time() - t:.0f} s)", flush=True)
    return p.returncode
