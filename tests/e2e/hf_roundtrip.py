"""Back to Hugging Face (issue #16), checked by transformers itself: every fixture is converted to
tp shards, the shards are merged back with `reshard merge`, and transformers' `from_pretrained`
must load the merged checkpoint with no missing, unexpected or mismatched keys and give a
state_dict bit-identical to the one it loads from the original fixture (tied weights included).

    python tests/e2e/hf_roundtrip.py --reshard target/debug/reshard --work DIR

Run by tests/e2e/run in the e2e venv (transformers and torch of tests/e2e/requirements.lock, the
environment that generated the newer fixtures). Exit 1 if any fixture fails.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CLASSES = {
    "bart": "BartForConditionalGeneration",
    "mbart": "MBartForConditionalGeneration",
    "whisper": "WhisperForConditionalGeneration",
    "mllama": "MllamaForConditionalGeneration",
}


def load(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    return model.state_dict(), info


def check(fixture: Path, reshard: str, work: Path, tp: int) -> list[str]:
    import torch
    import transformers

    model_type = json.loads((fixture / "config.json").read_text())["model_type"]
    cls = getattr(transformers, CLASSES[model_type])
    shards, merged = work / f"{fixture.name}-tp{tp}", work / f"{fixture.name}-tp{tp}-hf"
    for cmd in (
        [reshard, "convert", str(fixture), "--tp", str(tp), "--out", str(shards), "--quiet", "--force"],
        # Small parts, so that the index and several files are exercised too.
        [reshard, "merge", str(shards), "--out", str(merged), "--quiet", "--force", "--max-part-size", "100KB"],
    ):
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    problems = []
    want, _ = load(cls, fixture)
    got, info = load(cls, merged)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(key):
            problems.append(f"{key}: {sorted(map(str, info[key]))[:8]}")
    if set(got) != set(want):
        problems.append(f"state_dict keys differ: {sorted(set(got) ^ set(want))[:8]}")
    for name in sorted(set(got) & set(want)):
        a, b = got[name], want[name]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b):
            problems.append(f"{name}: differs ({a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)})")
    parts = sorted(p.name for p in merged.glob("*.safetensors"))
    print(f"  {fixture.name}: tp {tp} -> merge: {len(parts)} file(s), {len(got)} state_dict tensors, "
          f"missing {len(info.get('missing_keys', []))}, unexpected {len(info.get('unexpected_keys', []))}: "
          f"{'OK' if not problems else 'FAIL'}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reshard", required=True)
    ap.add_argument("--work", required=True, type=Path)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    import transformers

    print(f"== hf_roundtrip: transformers {transformers.__version__}, torch {torch.__version__}")
    a.work.mkdir(parents=True, exist_ok=True)
    fixtures = sorted(p for p in (Path(__file__).parents[2] / "fixtures").iterdir() if (p / "config.json").exists())
    failed = 0
    for fx in fixtures:
        # The largest of 4, 3, 2 that the fixture takes: kv heads are replicated where it can.
        tp = next(t for t in (4, 3, 2) if subprocess.run(
            [a.reshard, "plan", str(fx), "--tp", str(t), "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ).returncode == 0)
        problems = check(fx, a.reshard, a.work, tp)
        for p in problems:
            print(f"    {p}")
        failed += bool(problems)
    print(f"{len(fixtures) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
