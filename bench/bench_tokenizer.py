"""Benchmark: the stored tokenizer with manifest-cached attributes vs a fresh AutoTokenizer per process.

For a tiny trained BPE tokenizer (1,024 ids) and a real-size one (150,000 ids: a byte-level BPE with the
Qwen2 pipeline and synthetic merges, built in about a second), it runs resolve (+ configure, untimed) +
tokenize-prep on a local model folder, then times, in the same process:

  (a) cached: load_stored_tokenizer(run, manifest outputs) (attributes from the manifest), then N requests
      each reading len(), all_special_ids and get_vocab() from the cache;
  (b) fresh: AutoTokenizer.from_pretrained(model folder), then N requests each computing len(),
      all_special_ids and get_vocab() on the plain tokenizer (what transformers does on every access).

Prints both side by side with N and the sizes, and writes bench/out/tokenizer.json.
Run: PYTHONPATH=. .venv/bin/python bench/bench_tokenizer.py [--n 1000] [--big 150000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_big_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of exactly `vocab_size` ids (the last 3 are the ChatML specials).

    Merges are synthetic (all byte pairs, then pair + byte), so the file has the size and structure of a real
    150k tokenizer.json (vocab + merges + added tokens) without minutes of training.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.support.tokenizer import CHATML_TEMPLATE, EOS_TOKEN, PAD_TOKEN, QWEN2_SPLIT_REGEX, SPECIAL_TOKENS

    target = vocab_size - len(SPECIAL_TOKENS)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    pairs = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= target:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
            pairs.append(a + b)
    for ab in pairs:
        for c in alphabet:
            if len(vocab) >= target:
                break
            if ab + c not in vocab:
                vocab[ab + c] = len(vocab)
                merges.append((ab, c))
        if len(vocab) >= target:
            break
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def model_folder(root: Path, tok) -> Path:
    """A model folder with the tokenizer, config.json and generation_config.json (no weights needed)."""
    root.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(root)
    n = len(tok)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    (root / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "vocab_size": n,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 4096,
                "eos_token_id": eos,
            }
        )
    )
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    return root


def requests(tok, n: int) -> int:
    """N "requests", each reading what request validation and detokenization read."""
    acc = 0
    for _ in range(n):
        acc += len(tok)
        acc += len(tok.all_special_ids)
        acc += len(tok.get_vocab())
    return acc


def measure(label: str, tok_factory, n: int, work: Path) -> dict:
    from prestage.runner.chain import run_stage
    from prestage.stages.base import Reporter
    from prestage.stages.tokenize_prep import load_stored_tokenizer

    folder = model_folder(work / f"model-{label}", tok_factory())
    run = work / f"run-{label}"
    quiet = Reporter(quiet=True)
    t0 = time.perf_counter()
    run_stage("resolve", run, {"model": str(folder)}, quiet, force=True)
    t_conf = time.perf_counter()
    run_stage("configure", run, {"model": str(folder)}, quiet, force=True)  # tokenize-prep reads it
    t0 += time.perf_counter() - t_conf  # not part of what is measured
    outputs = run_stage("tokenize-prep", run, {"model": str(folder)}, quiet, force=True).manifest.record
    prep_s = time.perf_counter() - t0

    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    cached = load_stored_tokenizer(run, outputs)
    a_load = time.perf_counter() - t0
    a_acc = requests(cached, n)
    a_total = time.perf_counter() - t0

    t0 = time.perf_counter()
    fresh = AutoTokenizer.from_pretrained(str(folder))
    b_load = time.perf_counter() - t0
    b_acc = requests(fresh, n)
    b_total = time.perf_counter() - t0
    if a_acc != b_acc:
        raise SystemExit(f"{label}: cached and fresh tokenizers disagree ({a_acc} vs {b_acc})")
    return {
        "label": label,
        "n_requests": n,
        "vocab_len": outputs.len,
        "tokenizer_json_bytes": (folder / "tokenizer.json").stat().st_size,
        "tokenize_prep_s": round(prep_s, 4),
        "cached": {
            "load_s": round(a_load, 4),
            "requests_s": round(a_total - a_load, 4),
            "per_request_us": round((a_total - a_load) / n * 1e6, 2),
            "total_s": round(a_total, 4),
        },
        "fresh": {
            "load_s": round(b_load, 4),
            "requests_s": round(b_total - b_load, 4),
            "per_request_us": round((b_total - b_load) / n * 1e6, 2),
            "total_s": round(b_total, 4),
        },
        "speedup_total": round(b_total / a_total, 2) if a_total else None,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="requests per tokenizer (default 1000)")
    ap.add_argument("--big", type=int, default=150_000, help="ids of the real-size tokenizer (default 150000)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "tokenizer.json"))
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never the network
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from tests.support.tokenizer import train_bpe_tokenizer

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tokenizer-") as tmp:
        work = Path(tmp)
        rows.append(measure("tiny", lambda: train_bpe_tokenizer(1024), args.n, work))
        rows.append(measure(f"{args.big // 1000}k", lambda: build_big_tokenizer(args.big), args.n, work))

    head = (
        f"{'tokenizer':>9} {'ids':>7} {'json MB':>7} {'N':>5} | {'cached load':>11} {'per req':>9} "
        f"{'total':>8} | {'fresh load':>10} {'per req':>9} {'total':>8} | {'speedup':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        a, b = r["cached"], r["fresh"]
        print(
            f"{r['label']:>9} {r['vocab_len']:>7} {r['tokenizer_json_bytes'] / 1e6:>7.2f} {r['n_requests']:>5} | "
            f"{a['load_s']:>10.3f}s {a['per_request_us']:>7.1f}us {a['total_s']:>7.3f}s | "
            f"{b['load_s']:>9.3f}s {b['per_request_us']:>7.1f}us {b['total_s']:>7.3f}s | {r['speedup_total']:>6.1f}x"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "tokenizer", "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
