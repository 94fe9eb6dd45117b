"""Checks reshard's BART output against a real vLLM running the out-of-tree BART plugin.

What it proves, on vLLM's CPU build (0.32) with vllm-project/bart-plugin 0.6.0
(tests/e2e/bart-plugin-0.6.0.patch applied, installed in the venv that runs this script):

1. Layout. The plugin model's per-rank state_dict(), filtered by
   ShardedStateLoader._filter_subtensors exactly as load_format="sharded_state" filters it
   (dumped from inside each vLLM worker, right before the loader runs), is the set of
   names, shapes and dtypes the loader requires. reshard's files
   (model-rank-R-part-P.safetensors, read from their headers) are compared with it per
   rank, at tp 1 and tp 2: every missing name, extra name, shape and dtype difference is
   reported. (The loader itself only fails on an unknown or missing name; a tensor smaller
   than its parameter is narrowed with a warning, so the shape check matters.)
2. Values. After the plugin loads the Hugging Face checkpoint with vLLM's default loader,
   its per-rank parameters are dumped and compared bit for bit with reshard's tensors of
   the same name (the padded embedding rows, final_logits_bias and the fused
   qkv_proj / kv_proj included), at tp 1 and tp 2.
3. Behaviour. Greedy tokens and the top-5 prompt and decode logprobs (text prompts,
   ignore_eos, 8 tokens) of the sharded_state load of reshard's output must equal those of
   the default load of the Hugging Face checkpoint exactly, at tp 1 and tp 2. The plugin
   0.6.0 cannot generate at tp 2 (BartCrossAttention splits kv_proj's per-rank output with
   the all-rank kv size); a failure that hits both loads alike, after both loaded their
   weights, is reported as a note, not counted against reshard. A second tp-2 pair of loads
   runs with that one line fixed in memory (self.kv_size = num_kv_heads * head_dim, applied
   by the hook below, not part of the patch file; --no-kv-fix skips it), and must match
   exactly. A difference between the two loads, or one load failing alone, is a failure.
4. Negative control. A copy of the tp-1 output with the k and v halves of one decoder
   layer's encoder_attn.kv_proj.weight swapped must load and give different logprobs, so
   the comparison in 3 can see a wrong cross-attention layout.

The model is a small random BART made here with transformers (d_model 256, 4 heads of 64,
2 + 2 layers, ffn 512, 64 positions, a 300-token byte-level BPE tokenizer made here, so
the vocabulary is not a multiple of 64 and every embedding is padded; tied embeddings),
every tensor re-randomized (HF init zeroes biases and final_logits_bias).

    VENV/bin/python tests/e2e/bart_plugin_check.py --reshard BIN --plugin PLUGIN_DIR --work DIR

VENV needs vllm (CPU build), torch, transformers, safetensors and the patched plugin
installed from PLUGIN_DIR (pip install --no-deps -e PLUGIN_DIR). Every vLLM load runs in a
subprocess of this script (`--child ...`), with a sitecustomize hook on PYTHONPATH so the
spawned vLLM workers dump their state_dict. Exit status 0 when everything matches, 1 on any
mismatch or failure; a summary is printed and written to DIR/summary.json.
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

from common import bytes_to_unicode, engine_args, rerandomize, run_group, top

TOP_K = 5
MAX_TOKENS = 8
VOCAB_SIZE = 300  # not a multiple of 64: every vocab-parallel embedding gets padded

# (encoder text, decoder prompt). The plugin takes the encoder text as "text"
# multi-modal data and tokenizes both with add_special_tokens=False.
PROMPTS = [
    ("the cat is on the mat and it is asleep", "<s>the"),
    ("a string of bytes: 0123456789 !?", "<s>in a"),
    ("of all the things, sand is the least wet", "<s>"),
]

# ---------------------------------------------------------------------------------------
# Step 1: the checkpoint
# ---------------------------------------------------------------------------------------

MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"), ("e", "r"), ("o", "n"),
    ("Ġ", "a"), ("r", "e"), ("a", "t"), ("e", "n"), ("o", "r"), ("Ġ", "s"), ("Ġ", "w"),
    ("e", "s"), ("i", "s"), ("Ġ", "o"), ("Ġ", "c"), ("i", "t"), ("Ġ", "b"), ("Ġ", "f"),
    ("Ġ", "p"), ("Ġ", "m"), ("in", "g"), ("Ġa", "n"), ("Ġan", "d"), ("o", "u"), ("Ġo", "f"),
    ("Ġ", "d"), ("a", "l"), ("e", "d"), ("Ġ", "h"), ("a", "r"), ("Ġ", "i"), ("Ġi", "s"),
    ("l", "e"), ("Ġ", "l"), ("a", "s"), ("s", "t"),
]


def make_tokenizer(out: Path):
    from transformers import BartTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in sorted(bytes_to_unicode().values()):
        vocab[c] = len(vocab)
    for a, b in MERGES:
        assert a in vocab and b in vocab and a + b not in vocab, (a, b)
        vocab[a + b] = len(vocab)
    vocab["<mask>"] = len(vocab)
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return BartTokenizer(vocab=vocab, merges=list(MERGES))


def make_bart(out: Path) -> None:
    import torch
    from safetensors import safe_open
    from transformers import BartConfig, BartForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]) == [0, 1, 2, 3, 299]
    config = BartConfig(
        vocab_size=len(tok),
        d_model=256,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=0,
        forced_eos_token_id=2,
        tie_word_embeddings=True,
        scale_embedding=False,
    )
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config).eval()
    rerandomize(model, seed=1234)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        flb = f.get_tensor("final_logits_bias")
    assert "model.shared.weight" in names and "final_logits_bias" in names, sorted(names)
    assert float(flb.abs().sum()) > 0, "final_logits_bias is still zero"
    print(f"[make] {out}: vocab {len(tok)}, {len(names)} tensors in model.safetensors", flush=True)


# ---------------------------------------------------------------------------------------
# The hook that runs inside every vLLM process (written as sitecustomize.py)
# ---------------------------------------------------------------------------------------

HOOK = r'''
# Written by bart_plugin_check.py. Active only when BART_CHECK_DUMP_DIR is set: patches
# vLLM's BaseModelLoader.load_model so that, in each worker, the model's state_dict is
# dumped right before the loader's load_weights (layout, filtered by
# ShardedStateLoader._filter_subtensors as the sharded_state loader filters it), and the
# loaded values right after it when BART_CHECK_DUMP_VALUES=1.
import os, sys
_DIR = os.environ.get("BART_CHECK_DUMP_DIR")
if _DIR:
    import importlib.abc, importlib.util
    _TARGET = "vllm.model_executor.model_loader.base_loader"

    def _rank():
        from vllm.distributed import get_tensor_model_parallel_rank
        return get_tensor_model_parallel_rank()

    def _desc(sd):
        return {k: [list(t.shape), str(t.dtype).replace("torch.", "")] for k, t in sd.items()}

    def _dump_layout(model):
        import json
        from vllm.model_executor.model_loader.sharded_state_loader import ShardedStateLoader
        sd = model.state_dict()
        filtered = ShardedStateLoader._filter_subtensors(sd)
        with open(os.path.join(_DIR, f"layout-rank-{_rank()}.json"), "w") as f:
            json.dump({"state_dict": _desc(sd), "filtered": _desc(filtered)}, f, indent=0)

    def _dump_values(model):
        import json
        from safetensors.torch import save_file
        from vllm.model_executor.model_loader.sharded_state_loader import ShardedStateLoader
        full = model.state_dict()
        sd = {k: t.detach().clone().contiguous() for k, t in full.items() if t.numel()}
        save_file(sd, os.path.join(_DIR, f"values-rank-{_rank()}.safetensors"))
        # What vLLM's own save_sharded_state would keep from this loaded model.
        kept = ShardedStateLoader._filter_subtensors(full)
        with open(os.path.join(_DIR, f"after-load-rank-{_rank()}.json"), "w") as f:
            json.dump({"dropped_by_filter": sorted(set(full) - set(kept))}, f)

    def _patch(mod):
        orig = mod.BaseModelLoader.load_model

        def load_model(self, *args, **kwargs):
            inner = self.load_weights

            def load_weights(model, model_config):
                _dump_layout(model)
                r = inner(model, model_config)
                if os.environ.get("BART_CHECK_DUMP_VALUES") == "1":
                    _dump_values(model)
                return r

            self.load_weights = load_weights
            try:
                return orig(self, *args, **kwargs)
            finally:
                del self.load_weights

        mod.BaseModelLoader.load_model = load_model

    def _fix_cross_kv_size(mod):
        # BART_CHECK_KV_FIX=1 only: the plugin's BartCrossAttention splits kv_proj's
        # output with the total (all-rank) kv size, which breaks at tp > 1. Use the
        # per-rank size, as BartDecoderSelfAttention does. Not part of the patch file.
        cls = mod.BartCrossAttention
        orig = cls.__init__

        def __init__(self, *args, **kwargs):
            orig(self, *args, **kwargs)
            self.kv_size = self.num_kv_heads * self.head_dim

        cls.__init__ = __init__

    _PATCHES = {_TARGET: _patch}
    if os.environ.get("BART_CHECK_KV_FIX") == "1":
        _PATCHES["vllm_bart_plugin.bart"] = _fix_cross_kv_size

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            fix = _PATCHES.pop(name, None)
            if fix is None:
                return None
            if not _PATCHES:
                sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            orig_exec = spec.loader.exec_module

            def exec_module(module):
                orig_exec(module)
                fix(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
'''


# ---------------------------------------------------------------------------------------
# Child: one vLLM engine, one load
# ---------------------------------------------------------------------------------------


def child(a) -> None:
    result = {"model": a.model, "tp": a.tp, "load_format": a.load_format}
    code = 0
    try:
        import vllm_bart_plugin  # noqa: F401  (fail early if the plugin is not installed)
        from vllm import LLM, SamplingParams

        result["plugin_file"] = vllm_bart_plugin.__file__
        # An explicit small KV cache: 64 tokens of a 4-layer-equivalent model need kilobytes, and
        # the CPU worker otherwise refuses to start when other processes hold memory.
        llm = LLM(**engine_args(a.model, a.tp, a.load_format), kv_cache_memory_bytes=64 << 20)
        result["loaded"] = True
        params = SamplingParams(
            temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_K, prompt_logprobs=TOP_K
        )
        prompts = [
            {
                "encoder_prompt": {"prompt": "", "multi_modal_data": {"text": enc}},
                "decoder_prompt": dec,
            }
            for enc, dec in PROMPTS
        ]
        outs = llm.generate(prompts, params)
        result["outputs"] = []
        for o in outs:
            c = o.outputs[0]
            result["outputs"].append(
                {
                    "prompt_token_ids": list(o.prompt_token_ids),
                    "prompt_logprobs": [top(e) for e in (o.prompt_logprobs or [])],
                    "token_ids": list(c.token_ids),
                    "logprobs": [top(e) for e in (c.logprobs or [])],
                }
            )
        print(f"[child] tp {a.tp} {a.load_format}: tokens {[r['token_ids'] for r in result['outputs']]}", flush=True)
    except BaseException as e:  # noqa: BLE001  (report every failure, vLLM raises many kinds)
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
        print(result["traceback"], flush=True)
        code = 1
    with open(a.out, "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    sys.stderr.flush()
    # vLLM's workers sometimes keep the interpreter alive at exit; the result is on disk.
    os._exit(code)


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------

ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64", "I32": "int32"}


def read_header(path: Path) -> dict:
    """{name: [shape, dtype]} of a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return {k: [v["shape"], ST_DTYPES.get(v["dtype"], v["dtype"])] for k, v in h.items()}


def rank_files(out: Path, rank: int) -> list[Path]:
    return sorted(out.glob(f"model-rank-{rank}-part-*.safetensors"))


class Report:
    def __init__(self):
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.data: dict = {}

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        print(f"FAIL {msg}", flush=True)

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        print(f"NOTE {msg}", flush=True)

    def ok(self, msg: str) -> None:
        print(f"ok   {msg}", flush=True)


def vllm_env(work: Path, tp: int, dump: Path, values: bool, kv_fix: bool = False) -> dict:
    env = dict(os.environ)
    env["BART_CHECK_KV_FIX"] = "1" if kv_fix else "0"
    env["PYTHONPATH"] = str(work / "hook") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["BART_CHECK_DUMP_DIR"] = str(dump)
    env["BART_CHECK_DUMP_VALUES"] = "1" if values else "0"
    # The KV cache is sized by kv_cache_memory_bytes in child(); VLLM_CPU_KVCACHE_SPACE
    # (whole GiB) would override it.
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    # MRV2 needs Triton, which this CPU build lacks: vLLM picks the V1 runner (see the patch).
    env.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    if tp == 2:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    return env


def root_cause(log: Path) -> str | None:
    """The last 'SomeError: ...' line a vLLM worker logged (the engine only says EngineDeadError)."""
    cause = None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("(Worker") and "ERROR" in line:
            msg = line.split("] ", 1)[-1].strip()
            head = msg.split(":", 1)[0]
            if head.endswith(("Error", "Exception")) and " " not in head:
                cause = msg
    return cause


def vllm_load(work: Path, name: str, model: Path, tp: int, load_format: str, values: bool, kv_fix: bool = False) -> dict:
    d = work / "runs" / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    out = d / "result.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", str(model), "--tp", str(tp),
           "--load-format", load_format, "--out", str(out)]
    print(f"[vllm] {name}: {model} tp {tp} load_format {load_format}", flush=True)
    rc = run_group(cmd, d / "log.txt", env=vllm_env(work, tp, d, values, kv_fix))
    res = json.loads(out.read_text()) if out.exists() else {"error": f"child exited {rc} without a result"}
    if res.get("error"):
        res["root_cause"] = root_cause(d / "log.txt")
    res["rc"] = rc
    res["dir"] = str(d)
    res["layout"] = {}
    for r in range(tp):
        p = d / f"layout-rank-{r}.json"
        if p.exists():
            res["layout"][r] = json.loads(p.read_text())
    if res.get("error"):
        print(f"     error: {res['error'][:400]}", flush=True)
        if res.get("root_cause"):
            print(f"     worker root cause: {res['root_cause'][:400]}", flush=True)
    return res


def compare_layout(rep: Report, tp: int, expected: dict, out: Path) -> dict:
    """expected: {rank: {"filtered": {name: [shape, dtype]}}} from the plugin; out: reshard's output dir."""
    findings = {}
    for r in range(tp):
        files = rank_files(out, r)
        if not files:
            rep.fail(f"tp {tp} rank {r}: reshard wrote no model-rank-{r}-part-*.safetensors")
            continue
        written: dict = {}
        for p in files:
            for k, v in read_header(p).items():
                if k in written:
                    rep.fail(f"tp {tp} rank {r}: {k} written twice")
                written[k] = v
        exp = expected[r]["filtered"]
        missing = sorted(set(exp) - set(written))
        extra = sorted(set(written) - set(exp))
        diff = [
            {"name": k, "plugin": exp[k], "reshard": written[k]}
            for k in sorted(set(exp) & set(written))
            if exp[k] != written[k]
        ]
        findings[r] = {"missing": missing, "extra": extra, "shape_or_dtype": diff, "n_plugin": len(exp), "n_reshard": len(written)}
        for k in missing:
            rep.fail(f"tp {tp} rank {r}: missing {k} (plugin expects {exp[k][0]} {exp[k][1]})")
        for k in extra:
            rep.fail(f"tp {tp} rank {r}: extra {k} (reshard wrote {written[k][0]} {written[k][1]}; the loader raises KeyError)")
        for d in diff:
            rep.fail(f"tp {tp} rank {r}: {d['name']}: plugin expects {d['plugin']}, reshard wrote {d['reshard']}")
        if not (missing or extra or diff):
            rep.ok(f"tp {tp} rank {r}: layout matches ({len(exp)} tensors, names, shapes, dtypes)")
        # Informative: what the filter drops, and the tensors the brief singles out.
        dropped = sorted(set(expected[r]["state_dict"]) - set(exp))
        if dropped:
            rep.note(f"tp {tp} rank {r}: _filter_subtensors drops {dropped}")
        for k in sorted(exp):
            if any(s in k for s in ("embed_tokens", "embed_positions", "lm_head", "final_logits_bias", "layers.0.encoder_attn.q_proj.weight",
                                     "layers.0.encoder_attn.kv_proj", "layers.0.self_attn.qkv_proj.weight")):
                print(f"     tp {tp} rank {r}: {k}: plugin {exp[k]} reshard {written.get(k)}", flush=True)
        scales = sorted({k.rsplit(".attn.", 1)[0] for k in exp if ".attn._" in k})
        print(f"     tp {tp} rank {r}: layers with attn._*_scale buffers in the plugin: {scales}", flush=True)
    return findings


def compare_values(rep: Report, tp: int, values_dir: Path, out: Path) -> None:
    """Bitwise: reshard's tensors against the plugin's parameters after it loaded the HF checkpoint."""
    import torch
    from safetensors import safe_open

    for r in range(tp):
        vp = values_dir / f"values-rank-{r}.safetensors"
        if not vp.exists():
            rep.fail(f"tp {tp} rank {r}: no value dump from the HF load")
            continue
        bad, same, absent = [], 0, []
        with safe_open(str(vp), "pt") as fv:
            have = set(fv.keys())
            for p in rank_files(out, r):
                with safe_open(str(p), "pt") as fr:
                    for k in fr.keys():
                        if k not in have:
                            absent.append(k)
                            continue
                        a, b = fv.get_tensor(k), fr.get_tensor(k)
                        if a.shape != b.shape or a.dtype != b.dtype:
                            bad.append(f"{k}: vllm {list(a.shape)} {a.dtype} vs reshard {list(b.shape)} {b.dtype}")
                        elif not torch.equal(a.view(torch.uint8) if a.dim() else a.reshape(1).view(torch.uint8),
                                             b.view(torch.uint8) if b.dim() else b.reshape(1).view(torch.uint8)):
                            n = int((a != b).sum())
                            bad.append(f"{k}: {n} of {a.numel()} elements differ")
                        else:
                            same += 1
        for m in bad:
            rep.fail(f"tp {tp} rank {r}: value {m}")
        if absent:
            rep.note(f"tp {tp} rank {r}: not in the HF-loaded model's state_dict to compare: {absent}")
        if not bad:
            rep.ok(f"tp {tp} rank {r}: {same} tensors bit-identical to the plugin's HF-loaded parameters")


def outputs_equal(a: dict, b: dict) -> tuple[bool, str]:
    oa, ob = a.get("outputs"), b.get("outputs")
    if oa is None or ob is None:
        return False, "no outputs"
    for i, (x, y) in enumerate(zip(oa, ob)):
        for key in ("prompt_token_ids", "token_ids", "prompt_logprobs", "logprobs"):
            if x[key] != y[key]:
                return False, f"prompt {i}: {key} differs: {str(x[key])[:300]} vs {str(y[key])[:300]}"
    if len(oa) != len(ob):
        return False, "different number of outputs"
    return True, "identical"


def swap_kv(src: Path, dst: Path, layer: int) -> str:
    """Copy src to dst with the k and v halves of one decoder layer's encoder_attn.kv_proj.weight swapped."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    name = f"model.decoder.layers.{layer}.encoder_attn.kv_proj.weight"
    for p in rank_files(dst, 0):
        with safe_open(str(p), "pt") as f:
            if name not in f.keys():
                continue
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        w = tensors[name]
        h = w.shape[0] // 2
        tensors[name] = torch.cat([w[h:], w[:h]]).contiguous()
        save_file(tensors, str(p), metadata=meta)
        return name
    raise SystemExit(f"{name} not found in {dst}")


def check_plan(rep: Report, tp: int, plan_json: str, out: Path) -> None:
    """`reshard plan --json` must list exactly what `convert` wrote (names, dtypes, shapes per rank)."""
    plan = json.loads(plan_json)
    planned: dict = {}
    for f in plan["files"]:
        for t in f["tensors"]:
            planned.setdefault(f["rank"], {})[t["name"]] = [t["shape"], ST_DTYPES.get(t["dtype"], t["dtype"])]
    for r in range(tp):
        written = {}
        for p in rank_files(out, r):
            written.update(read_header(p))
        if planned.get(r) != written:
            rep.fail(f"tp {tp} rank {r}: reshard plan --json differs from the files convert wrote")
        else:
            rep.ok(f"tp {tp} rank {r}: reshard plan --json == written headers ({len(written)} tensors)")


def compare_generation(rep: Report, label: str, h: dict, s: dict, tolerate_same_failure: bool) -> str:
    he, se = h.get("error"), s.get("error")
    hc, sc = h.get("root_cause") or he, s.get("root_cause") or se
    if he is None and se is None:
        same, why = outputs_equal(h, s)
        if same:
            rep.ok(f"{label}: sharded_state load of reshard's output == HF load: tokens and top-{TOP_K} prompt/decode "
                   f"logprobs identical (tokens {[o['token_ids'] for o in h['outputs']]})")
        else:
            rep.fail(f"{label}: sharded_state load differs from HF load: {why}")
        return why
    if se is not None and he is None:
        rep.fail(f"{label}: sharded_state load of reshard's output failed where the HF load worked: {sc[:1000]}")
        return f"sharded load failed: {sc}"
    if he is not None and se is None:
        rep.fail(f"{label}: HF load failed where the sharded load worked: {hc[:1000]}")
        return f"HF load failed: {hc}"
    alike = h.get("loaded") and s.get("loaded") and hc == sc
    if alike and tolerate_same_failure:
        rep.note(f"{label}: both loads loaded their weights, then generation failed alike (the plugin's own bug): {hc[:600]}")
    else:
        rep.fail(f"{label}: both loads failed (alike: {bool(alike)}): HF: {hc[:500]} | sharded: {sc[:500]}")
    return f"both failed (alike: {bool(alike)}): {hc}"


def driver(a) -> int:
    t0 = time.time()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rep = Report()
    reshard = str(Path(a.reshard).resolve())

    import vllm_bart_plugin

    plugin_file = Path(vllm_bart_plugin.__file__).resolve()
    if Path(a.plugin).resolve() not in plugin_file.parents:
        print(f"vllm_bart_plugin is imported from {plugin_file}, not from --plugin {a.plugin}: "
              f"pip install --no-deps -e {a.plugin} into this venv", file=sys.stderr)
        return 1
    (work / "hook").mkdir(exist_ok=True)
    (work / "hook" / "sitecustomize.py").write_text(HOOK)

    # Step 1: the checkpoint
    hf = work / "hf"
    if hf.exists():
        shutil.rmtree(hf)
    make_bart(hf)

    # reshard convert / verify / plan
    outs = {}
    for tp in a.tp:
        o = work / f"reshard-tp{tp}"
        log = work / f"reshard-convert-tp{tp}.log"
        if run_group([reshard, "convert", str(hf), "--tp", str(tp), "--out", str(o), "--force", "-q"], log) != 0:
            rep.fail(f"reshard convert --tp {tp} failed: {log.read_text()[-2000:]}")
            continue
        log = work / f"reshard-verify-tp{tp}.log"
        if run_group([reshard, "verify", str(hf), str(o)], log) != 0:
            rep.fail(f"reshard verify --tp {tp} failed: {log.read_text()[-2000:]}")
        plan = subprocess.run([reshard, "plan", str(hf), "--tp", str(tp), "--json"], capture_output=True, text=True)
        (work / f"reshard-plan-tp{tp}.json").write_text(plan.stdout)
        if plan.returncode != 0:
            rep.fail(f"reshard plan --tp {tp} --json failed: {plan.stderr[-1000:]}")
        else:
            check_plan(rep, tp, plan.stdout, o)
        outs[tp] = o

    # vLLM loads, one engine per subprocess
    results = {}
    for tp in a.tp:
        results[f"hf-tp{tp}"] = vllm_load(work, f"hf-tp{tp}", hf, tp, "auto", values=True)
        if tp in outs:
            results[f"sharded-tp{tp}"] = vllm_load(work, f"sharded-tp{tp}", outs[tp], tp, "sharded_state", values=False)
        if tp > 1 and a.kv_fix:
            results[f"hf-tp{tp}-kvfix"] = vllm_load(work, f"hf-tp{tp}-kvfix", hf, tp, "auto", values=False, kv_fix=True)
            if tp in outs:
                results[f"sharded-tp{tp}-kvfix"] = vllm_load(work, f"sharded-tp{tp}-kvfix", outs[tp], tp,
                                                             "sharded_state", values=False, kv_fix=True)
    if 1 in outs:
        neg = work / "reshard-tp1-kvswap"
        swapped = swap_kv(outs[1], neg, layer=0)
        rep.note(f"negative control: {swapped} k/v halves swapped in {neg}")
        results["negative-tp1"] = vllm_load(work, "negative-tp1", neg, 1, "sharded_state", values=False)

    # Steps 2-3: layout and values, per rank
    layouts = {}
    for tp in a.tp:
        hfres = results[f"hf-tp{tp}"]
        layout = hfres["layout"]
        if len(layout) != tp:
            rep.fail(f"tp {tp}: no state_dict dump from every worker of the HF load ({sorted(layout)}): {hfres.get('error')}")
            continue
        for key in (f"sharded-tp{tp}", f"hf-tp{tp}-kvfix", f"sharded-tp{tp}-kvfix"):
            for r, lay in results.get(key, {}).get("layout", {}).items():
                if lay != layout[r]:
                    rep.fail(f"tp {tp} rank {r}: the model's state_dict in {key} differs from the HF load's")
        layouts[tp] = {r: v["filtered"] for r, v in layout.items()}
        if tp in outs:
            rep.data[f"layout-tp{tp}"] = compare_layout(rep, tp, layout, outs[tp])
            compare_values(rep, tp, Path(hfres["dir"]), outs[tp])
        after = Path(hfres["dir"]) / "after-load-rank-0.json"
        if after.exists():
            dropped = json.loads(after.read_text())["dropped_by_filter"]
            rep.data[f"dropped-after-hf-load-tp{tp}"] = dropped
            if dropped:
                rep.note(f"tp {tp}: after the HF load the plugin ties its embeddings, so _filter_subtensors of the loaded "
                         f"model (what vLLM's save_sharded_state writes) would drop {dropped}; a fresh model, which "
                         "sharded_state loads into, needs them")
    (work / "plugin-layout.json").write_text(json.dumps({str(k): v for k, v in layouts.items()}, indent=1))

    # Step 4: behaviour
    gen = {}
    for tp in a.tp:
        if f"sharded-tp{tp}" in results:
            gen[f"tp{tp}"] = compare_generation(rep, f"tp {tp}", results[f"hf-tp{tp}"], results[f"sharded-tp{tp}"],
                                                tolerate_same_failure=tp > 1)
        if f"sharded-tp{tp}-kvfix" in results:
            gen[f"tp{tp}-kvfix"] = compare_generation(rep, f"tp {tp} (plugin kv_size fixed in memory)",
                                                      results[f"hf-tp{tp}-kvfix"], results[f"sharded-tp{tp}-kvfix"],
                                                      tolerate_same_failure=False)
    rep.data["generation"] = gen

    if "negative-tp1" in results:
        n, h = results["negative-tp1"], results["hf-tp1"]
        if n.get("error"):
            rep.fail(f"negative control did not run: {n['error'][:500]}")
        elif h.get("error"):
            rep.fail("negative control: no HF result to compare with")
        else:
            same, why = outputs_equal(h, n)
            rep.data["negative"] = why
            if same:
                rep.fail("negative control: swapping k/v in cross-attention changed nothing; the comparison is blind")
            else:
                rep.ok(f"negative control: k/v-swapped output differs from HF ({why[:200]})")

    wall = time.time() - t0
    summary = {"failures": rep.failures, "notes": rep.notes, "data": rep.data, "wall_s": round(wall, 1),
               "results": {k: {kk: v.get(kk) for kk in ("rc", "error", "root_cause", "loaded", "dir")}
                           for k, v in results.items()}}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{len(rep.failures)} failure(s), {len(rep.notes)} note(s), {wall:.0f}s; summary in {work / 'summary.json'}")
    for f in rep.failures:
        print(f"  FAIL {f[:600]}")
    return 1 if rep.failures else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reshard", help="reshard binary")
    ap.add_argument("--plugin", help="bart-plugin source tree (patched, pip-installed -e into this venv)")
    ap.add_argument("--work", help="work directory (made; reused files are overwritten)")
    ap.add_argument("--tp", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2], help="tp sizes, default 1,2")
    ap.add_argument("--no-kv-fix", dest="kv_fix", action="store_false",
                    help="skip the extra tp>1 pair of loads with the plugin's cross-attention kv_size fixed in memory")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--load-format", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.tp = a.tp[0]
        child(a)
        return
    if not (a.reshard and a.plugin and a.work):
        ap.error("--reshard, --plugin and --work are required")
    sys.exit(driver(a))


if __name__ == "__main__":
    main()
