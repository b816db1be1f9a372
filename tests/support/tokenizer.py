"""A real byte-level BPE tokenizer trained offline, shaped like Qwen2's, for tests and benchmarks.

`train_bpe_tokenizer()` trains a BPE model with the `tokenizers` library on local text (the Python
standard library's own sources, so no download is needed) through Qwen2's pipeline: NFC normalizer,
Qwen's split regex, ByteLevel pre-tokenizer and decoder. It then adds the ChatML special tokens and
wraps the result in transformers' fast tokenizer class with a ChatML chat template, ready for
`save_pretrained`. The tiny (1024-token) tokenizer is cached per process; callers get a deep copy.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

# Qwen2's pre-tokenizer split regex (as in transformers' Qwen2Tokenizer / Qwen2's tokenizer.json).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# ChatML, as Qwen2-Instruct ships it (minus the tool-calling branches).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files():
    """Yield stdlib .py files in a fixed order: the top level first, then package folders (no tests)."""
    root = _stdlib_dir()
    yield from sorted(root.glob("*.py"))
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name in {"site-packages", "test", "idlelib", "lib2to3"}:
            continue
        yield from sorted(p for p in sub.rglob("*.py") if "test" not in p.parts and "tests" not in p.parts)
    # A large vocabulary wants more text: the test suites come next, then installed packages' sources.
    for name in ("test", "idlelib", "lib2to3"):
        if (root / name).is_dir():
            yield from sorted((root / name).rglob("*.py"))
    purelib = Path(sysconfig.get_paths()["purelib"])
    if purelib.is_dir() and purelib != root:
        for pkg in sorted(p for p in purelib.iterdir() if p.is_dir()):
            yield from sorted(pkg.rglob("*.py"))


def corpus_texts(corpus_bytes: int) -> list[str]:
    """Return about `corpus_bytes` of text read from the Python stdlib sources, in a fixed order."""
    texts: list[str] = []
    total = 0
    for path in _source_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= corpus_bytes:
            break
    if not texts:
        raise RuntimeError(f"no training text found under {_stdlib_dir()}: cannot train a tokenizer offline")
    return texts


def _train_backend(vocab_size: int, corpus_bytes: int):
    """Train and return a raw `tokenizers.Tokenizer` (byte-level BPE, Qwen2 pipeline, ChatML specials)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Reserve room so the specials land inside vocab_size: ids [0, vocab_size - 3) are BPE, the rest specials.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus_texts(corpus_bytes), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _wrap(backend):
    """Wrap a raw tokenizer in transformers' fast tokenizer class with ChatML settings."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


@functools.lru_cache(maxsize=4)
def _cached_backend_json(vocab_size: int, corpus_bytes: int) -> str:
    return _train_backend(vocab_size, corpus_bytes).to_str()


def train_bpe_tokenizer(vocab_size: int = 1024, corpus_bytes: int | None = None):
    """Return a transformers fast tokenizer with a freshly trained (or per-process cached) byte-level BPE.

    `corpus_bytes` defaults to 2 MB for small vocabularies and grows for large ones (a 150k vocabulary
    needs far more distinct merges than 2 MB of text yields). The returned object is a new instance
    each call, so callers may mutate it.
    """
    from tokenizers import Tokenizer

    if corpus_bytes is None:
        corpus_bytes = 2_000_000 if vocab_size <= 32_000 else 40_000_000
    backend = Tokenizer.from_str(_cached_backend_json(vocab_size, corpus_bytes))
    return _wrap(backend)
