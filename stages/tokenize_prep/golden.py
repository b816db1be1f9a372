"""Golden encodings: fixed strings encoded at tokenize-prep time, re-checked by launch and verify.

Plain strings (ASCII, code, CJK, emoji) are encoded with the tokenizer's default special tokens, as a
completion prompt is; the chat turn is rendered through the resolved chat template with a generation
prompt and encoded without adding special tokens (the template already writes them), as a chat request is.
`check_golden(tok, outputs)` raises IntegrityError naming the first string whose ids differ.
"""

from __future__ import annotations

from prestage.stages import errors

STRINGS = (
    ("ascii", "Hello, world! The quick brown fox jumps over the lazy dog."),
    ("code", "def add(a: int, b: int) -> int:\n    return a + b  # sum\n\tif x != y: pass\n"),
    ("cjk", "你好，世界！今日は良い天気ですね。안녕하세요."),
    ("emoji", "Rockets 🚀, llamas 🦙, hearts ❤️ and a coder 👩\u200d💻."),
)
CHAT_MESSAGES = ({"role": "user", "content": "What is 2 + 2? Answer briefly."},)


def _ids(tok, text: str, add_special_tokens: bool) -> list[int]:
    return [int(i) for i in tok.encode(text, add_special_tokens=add_special_tokens)]


def render_chat(tok, template: str) -> str:
    return tok.apply_chat_template(
        list(CHAT_MESSAGES), chat_template=template, tokenize=False, add_generation_prompt=True
    )


def golden(tok, template: str | None) -> tuple[list[dict], list[str]]:
    """([{name, text, ids, add_special_tokens}], warnings)."""
    out = [
        {"name": name, "text": text, "ids": _ids(tok, text, True), "add_special_tokens": True} for name, text in STRINGS
    ]
    warnings = []
    if template is not None:
        try:
            rendered = render_chat(tok, template)
        except Exception as e:
            warnings.append(
                f"the chat template does not render a plain user turn ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:160]}); chat requests will fail"
            )
        else:
            if isinstance(rendered, str):
                out.append(
                    {"name": "chat", "text": rendered, "ids": _ids(tok, rendered, False), "add_special_tokens": False}
                )
    return out, warnings


def check_golden(tok, record) -> None:
    """Raise IntegrityError naming the first golden string `tok` no longer encodes to the recorded ids."""
    for entry in record.golden:  # the TokenizerRecord's GoldenEncodings
        got = _ids(tok, entry.text, entry.add_special_tokens)
        want = list(entry.ids)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
            exp = want[at] if at < len(want) else "end"
            act = got[at] if at < len(got) else "end"
            raise errors.IntegrityError(
                f"tokenizer encodes golden string '{entry.name}' differently from tokenize-prep (position "
                f"{at}: expected {exp}, got {act}); the tokenizer changed: re-run tokenize-prep"
            )
