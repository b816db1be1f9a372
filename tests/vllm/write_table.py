"""Regenerate stages/launch/vllm_table.py from vLLM's own registry (run after changing the pinned vLLM).

    .venv-vllm/bin/python tests/vllm/oracle.py registry > /tmp/registry.json
    .venv/bin/python tests/vllm/write_table.py /tmp/registry.json

tests/vllm/test_vllm_registry.py fails while the table and the installed vLLM disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGET = Path(__file__).resolve().parents[2] / "stages" / "launch" / "vllm_table.py"

HEAD = '''"""vLLM {version}'s tables of architectures and config classes, as data (tests/vllm/write_table.py).

    GENERATE        architecture -> vLLM's "module.Class" for the generate runner (text and multimodal models)
    POOLING         architecture -> "module.Class" of the pooling runner (embedding, reward, classification)
    DRAFT           architecture -> "module.Class" of speculative-decoding draft models
    TRANSFORMERS_SUPPORTED, TRANSFORMERS_BACKEND   names vLLM runs with its Transformers backend
    PREVIOUSLY_SUPPORTED   architecture -> last vLLM version that ran it
    OUT_OF_TREE     architecture -> the plugin that runs it now
    CONFIG_TYPES    model types vLLM builds with its own config classes (no remote code needed)

configure reads these to say whether vLLM can run a model (and how) and which runner vLLM picks for an
architecture name, so a registered `ChatGLMModel` is not taken for a pooling `*Model`. Importable without
torch or transformers. tests/vllm/test_vllm_registry.py compares this file with the installed vLLM.
"""

# ruff: noqa: E501 (vLLM's own class names)
from __future__ import annotations

VLLM_VERSION = {version!r}
'''


def main(src: str) -> None:
    d = json.loads(Path(src).read_text())
    out = [HEAD.format(version=d["version"])]
    for name, key in (("GENERATE", "generate"), ("POOLING", "pooling"), ("DRAFT", "draft")):
        out.append(f"\n{name}: dict[str, str] = {{\n")
        out += [f"    {a!r}: {c!r},\n" for a, c in sorted(d[key].items())]
        out.append("}\n")
    for name, key in (
        ("TRANSFORMERS_SUPPORTED", "transformers_supported"),
        ("TRANSFORMERS_BACKEND", "transformers_backend"),
        ("CONFIG_TYPES", "config_registry"),
    ):
        out.append(f"\n{name}: tuple[str, ...] = (\n")
        out += [f"    {a!r},\n" for a in d[key]]
        out.append(")\n")
    for name, key in (("PREVIOUSLY_SUPPORTED", "previously_supported"), ("OUT_OF_TREE", "out_of_tree")):
        out.append(f"\n{name}: dict[str, str] = {{\n")
        out += [f"    {a!r}: {c!r},\n" for a, c in sorted(d[key].items())]
        out.append("}\n")
    TARGET.write_text(out[0] + "".join(out[1:]).replace("'", '"'))


if __name__ == "__main__":
    main(sys.argv[1])
