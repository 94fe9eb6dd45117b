"""End-to-end: a real vLLM (CPU build) loads reshard's Whisper output and computes exactly what it
computes from the Hugging Face checkpoint.

    python tests/e2e/e2e_whisper.py --reshard target/debug/reshard --work DIR

1. Makes a small random Whisper with transformers (make_whisper.py; nothing from a hub).
2. Converts it with `reshard convert --verify` at tp 1 and tp 2 (`--target` as given, else the
   default).
3. Loads each in vLLM with load_format="sharded_state", and the HF checkpoint with the default
   loader at the same tp (run_vllm.py, one process per engine), and asserts that the greedy tokens
   and the top-5 prompt and decode logprobs are identical, value for value.
4. Negative control: the tp-1 output with the k and v halves of one cross-attention kv_proj
   swapped must give different logprobs in vLLM (so the comparison can fail), and `reshard verify`
   must reject it.
5. With `--refused T`: the tp-1 output made for another target T must be refused by this vLLM's
   loader (a missing or an unknown state_dict key), so the choice of target is what makes it load.
6. With `--own-shards`, vLLM's own shards (issue #16): this vLLM loads the HF checkpoint at tp 2 and writes its
   `save_sharded_state` (save_vllm.py); `reshard verify HF THAT` must accept vLLM's own layout,
   `reshard convert THAT --tp 1` must be byte-identical to `reshard convert HF --tp 1`, and
   `reshard merge THAT` must give back every tensor of the HF checkpoint bit for bit.

Exits 0 when every assertion holds, 1 otherwise; prints one line per check.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import run_group

HERE = Path(__file__).resolve().parent
SWAPPED = "model.decoder.layers.0.encoder_attn.kv_proj.weight"


def sh(cmd, **kw):
    print("+ " + " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def vllm_env(tp):
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND="0|1" if tp == 2 else "0-1" if (os.cpu_count() or 1) >= 2 else "0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def load(model, tp, load_format, out, log):
    """Runs run_vllm.py on `model` as its own process group; its exit status."""
    cmd = [sys.executable, str(HERE / "run_vllm.py"), str(model), "--tp", str(tp), "--load-format", load_format,
           "--out", str(out)]
    return run_group(cmd, log, env=vllm_env(tp), timeout=900)


def vllm(model, tp, load_format, out, log):
    """Loads `model` in vLLM and returns its outputs; a load that fails ends the test."""
    code = load(model, tp, load_format, out, log)
    if code != 0 or not Path(out).exists():
        tail = Path(log).read_text(errors="replace").splitlines()[-25:]
        print("\n".join(tail))
        raise SystemExit(f"FAIL: vLLM could not load {model} (tp {tp}, {load_format}); log: {log}")
    return json.loads(Path(out).read_text())["outputs"]


def swap_kv(src: Path, dst: Path):
    """A copy of the tp-1 output with the k and v halves of one kv_proj swapped."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = dst / "model-rank-0-part-0.safetensors"
    tensors = load_file(f)
    w = tensors[SWAPPED]
    half = w.shape[0] // 2
    tensors[SWAPPED] = w.roll(half, dims=0).contiguous()
    assert not tensors[SWAPPED].equal(w)
    save_file(tensors, f, metadata={"format": "pt"})


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        for key in ("prompt_token_ids", "token_ids", "prompt_logprobs", "logprobs"):
            if x[key] != y[key]:
                for j, (u, v) in enumerate(zip(x[key], y[key])):
                    if u != v:
                        return f"prompt {i}: {key}[{j}]: {u} != {v}"
                return f"prompt {i}: {key} lengths {len(x[key])} != {len(y[key])}"
    return None if len(a) == len(b) else f"{len(a)} != {len(b)} outputs"


def own_shards(a, hf, work, target, check):
    """Step 6: vLLM writes its own tp-2 sharded state; reshard verifies it, reshards it to tp 1 and
    merges it back."""
    saved = work / "vllm-saved-tp2"
    cmd = [sys.executable, str(HERE / "save_vllm.py"), str(hf), "--tp", "2", "--out", str(saved)]
    code = run_group(cmd, work / "save-tp2.log", env=vllm_env(2), timeout=900)
    check(code == 0 and (saved / "model-rank-1-part-0.safetensors").exists(),
          f"vLLM writes its sharded state at tp 2 (exit {code}): {sorted(p.name for p in saved.glob('*'))}")
    r = subprocess.run([a.reshard, "verify", str(hf), str(saved), "--no-forward", *target], capture_output=True, text=True)
    check(r.returncode == 0, "reshard verify accepts vLLM's own tp-2 shards as the layout of the checkpoint"
                             + ("" if r.returncode == 0 else f": {(r.stdout + r.stderr)[-600:]}"))
    back = work / "vllm-saved-to-tp1"
    r = subprocess.run([a.reshard, "convert", str(saved), "--tp", "1", "--out", str(back), "--quiet", *target],
                       capture_output=True, text=True)
    same = r.returncode == 0 and all(
        (back / f.name).read_bytes() == f.read_bytes() for f in (work / "tp1").glob("model-rank-*.safetensors"))
    check(same, "reshard convert of vLLM's tp-2 shards to tp 1 is byte-identical to converting the checkpoint"
                + ("" if r.returncode == 0 else f": {r.stderr[-600:]}"))
    merged = work / "vllm-saved-merged"
    r = subprocess.run([a.reshard, "merge", str(saved), "--out", str(merged), "--quiet"], capture_output=True, text=True)
    ok = r.returncode == 0
    if ok:
        from safetensors.torch import load_file
        want, got = load_file(hf / "model.safetensors"), load_file(merged / "model.safetensors")
        ok = set(want) == set(got) and all(
            want[k].dtype == got[k].dtype and want[k].shape == got[k].shape and want[k].view(-1).view(torch_uint8()).equal(
                got[k].view(-1).view(torch_uint8())) for k in want)
    check(ok, "reshard merge of vLLM's tp-2 shards gives back every tensor of the checkpoint bit for bit"
              + ("" if r.returncode == 0 else f": {r.stderr[-600:]}"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reshard", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--target", help="reshard --target (default: reshard's default)")
    ap.add_argument("--refused", help="a target whose output this vLLM must refuse to load")
    ap.add_argument("--own-shards", action="store_true", help="also read back vLLM's own save_sharded_state")
    a = ap.parse_args()
    target = ["--target", a.target] if a.target else []
    work = Path(a.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    hf = work / "hf"
    sh([sys.executable, str(HERE / "make_whisper.py"), str(hf)])
    passed, failures = [], []

    def check(ok, what):
        print(("ok:   " if ok else "FAIL: ") + what, flush=True)
        (passed if ok else failures).append(what)

    results = {}
    for tp in (1, 2):
        out = work / f"tp{tp}"
        sh([a.reshard, "convert", str(hf), "--tp", str(tp), "--out", str(out), "--verify", "--quiet", *target],
           stdout=subprocess.DEVNULL)
        ref = vllm(hf, tp, "auto", work / f"hf-tp{tp}.json", work / f"hf-tp{tp}.log")
        got = vllm(out, tp, "sharded_state", work / f"shard-tp{tp}.json", work / f"shard-tp{tp}.log")
        results[tp] = (ref, got)
        diff = first_difference(ref, got)
        n = sum(len(o["logprobs"]) + len(o["prompt_logprobs"]) for o in ref)
        check(diff is None, f"tp {tp}: sharded_state load == HF load ({len(ref)} prompts, {n} top-5 logprob "
                            f"positions, tokens {[o['token_ids'] for o in got]})" + (f": {diff}" if diff else ""))

    bad = work / "tp1-kv-swapped"
    swap_kv(work / "tp1", bad)
    r = subprocess.run([a.reshard, "verify", str(hf), str(bad), "--no-forward"], capture_output=True, text=True)
    check(r.returncode == 1 and SWAPPED in r.stdout + r.stderr,
          f"negative control: reshard verify rejects the output with {SWAPPED} k/v swapped (exit {r.returncode})")
    swapped = vllm(bad, 1, "sharded_state", work / "swapped-tp1.json", work / "swapped-tp1.log")
    diff = first_difference(results[1][0], swapped)
    check(diff is not None, f"negative control: vLLM's logprobs change with {SWAPPED} k/v swapped"
                            + (f" (first difference: {diff})" if diff else ""))

    if a.refused:
        other = work / "tp1-other-target"
        sh([a.reshard, "convert", str(hf), "--tp", "1", "--out", str(other), "--quiet", "--target", a.refused],
           stdout=subprocess.DEVNULL)
        log = work / "other-target-tp1.log"
        code = load(other, 1, "sharded_state", work / "other-target-tp1.json", log)
        lines = log.read_text(errors="replace").splitlines()
        why = [l[l.find(k):][:150] for l in lines for k in ("Missing keys", "KeyError") if k in l]
        check(code != 0 and bool(why), f"the output for target {a.refused} is refused by this vLLM: "
                                       + (why[-1] if why else f"exit {code}, no key error in {log}"))

    # 6. vLLM's own sharded state, read back by reshard.
    if a.own_shards:
        own_shards(a, hf, work, target, check)

    print(f"{len(passed)} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)


def torch_uint8():
    import torch

    return torch.uint8


if __name__ == "__main__":
    main()
