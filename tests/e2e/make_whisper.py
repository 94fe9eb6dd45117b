"""Makes the end-to-end test's Whisper checkpoint from the real transformers classes.

A small random Whisper (d_model 256, 4 heads of 64, 2 encoder + 2 decoder layers; head_dim 64
because vLLM's CPU attention backend rejects tiny head sizes), every tensor re-randomized (HF
init zeroes biases and sets norms to one, which would hide a bias or norm in the wrong place),
saved with `save_pretrained` together with a byte-level tokenizer and a feature extractor made
here, so nothing comes from a hub.

    python tests/e2e/make_whisper.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from common import bytes_to_unicode, rerandomize
from transformers import (
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|transcribe|>",
    "<|translate|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",
]


def make_tokenizer(tmp: Path) -> WhisperTokenizer:
    alphabet = sorted(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    # A few merges so the tokenizer is a real BPE, not only bytes.
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = WhisperTokenizer(
        str(tmp / "vocab.json"),
        str(tmp / "merges.txt"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    return tok


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    config = WhisperConfig(
        vocab_size=len(tok),
        num_mel_bins=80,
        d_model=256,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        suppress_tokens=[],
        begin_suppress_tokens=[],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    rerandomize(model, seed=1234)
    model.save_pretrained(out, safe_serialization=True)
    fe = WhisperFeatureExtractor(feature_size=80)
    WhisperProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(out)
    for f in ("vocab.json", "merges.txt"):
        assert (out / f).exists(), f
    print(f"wrote {out}: vocab {len(tok)}, {sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
