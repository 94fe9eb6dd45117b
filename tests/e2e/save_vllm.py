"""Has vLLM (CPU build) load a Hugging Face checkpoint and write its own sharded state, as
vLLM's examples/offline_inference/save_sharded_state.py does: the rank files of
`ShardedStateLoader.save_model`, plus the checkpoint's non-weight files copied beside them.

    python tests/e2e/save_vllm.py MODEL_DIR --tp N --out DIR

Used by e2e_whisper.py: reshard must read such a directory back (issue #16).

vLLM's CPU build packs every linear weight for its GEMM kernels after loading and then replaces
the weight by an empty tensor (`UnquantizedLinearMethod.process_weights_after_loading`,
`dispatch_cpu_unquantized_gemm(layer, remove_weight=True)` in vllm 0.32.0), so its
`save_sharded_state` writes no linear weight at all: a state vLLM itself cannot load. Here the
weights are kept (`cpu_linear = F.linear`, as a GPU build keeps them) before the engine starts;
names, shapes and the file layout are vLLM's own. The change is made by a `sitecustomize` module
on PYTHONPATH, so that every process of the engine (the engine core, each tp worker) has it.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

from common import engine_args


KEEP = """
import torch
import vllm.model_executor.layers.linear as linear


def keep_weight(self, layer):
    layer.cpu_linear = torch.nn.functional.linear


linear.UnquantizedLinearMethod.process_weights_after_loading = keep_weight
"""


def main():
    if os.environ.get("RESHARD_SAVE_VLLM_CHILD") != "1":
        # Again, with the sitecustomize module on PYTHONPATH for this process and its children.
        site = Path(sys.argv[sys.argv.index("--out") + 1] + ".site")
        site.mkdir(parents=True, exist_ok=True)
        (site / "sitecustomize.py").write_text(KEEP)
        env = dict(os.environ, RESHARD_SAVE_VLLM_CHILD="1")
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from vllm import LLM

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(**engine_args(a.model, a.tp, "auto"), limit_mm_per_prompt={"audio": 1})
    llm.llm_engine.engine_core.save_sharded_state(path=str(out))
    for f in Path(a.model).iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt") and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    print(f"save_vllm: {sorted(p.name for p in out.iterdir())}", flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
