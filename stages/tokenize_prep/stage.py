"""The tokenize-prep stage: load the model's tokenizer as vLLM does, store it, and record what launch needs.

Reads resolve's and configure's manifests (configure first, as for every later stage). Steps, following
vLLM (docs/vllm-rules.md, §4):
  1. source.locate: the model's own tokenizer at resolve's pinned commit, or --tokenizer (hub id, pinned
     to a commit here, or a local folder); hub files come as a non-weight snapshot into HF_HUB_CACHE.
  2. source.pick_mode: --tokenizer-mode auto -> mistral (consolidated*.safetensors + tekken.json /
     tokenizer.model.v*) or hf.
  3. loader.preflight + loader.load: AutoTokenizer.from_pretrained (or MistralCommonBackend), one-line errors.
  4. cached.cached_attributes (§4.5), bos/eos/pad ids (eos merged with generation_config.json), the added
     vocab, chat_template.resolve (§4.7), golden.golden encodings, the model's vocab size and the largest
     valid id (§4.6), with a warning when the tokenizer has ids the model cannot embed.
  5. store.save: `<run>/tokenizer/` (save_pretrained + the original tokenizer.json bytes), every file
     listed with size and sha256.

For launch: `load_stored_tokenizer(run_dir, outputs)` and `check_golden(tokenizer, outputs)`;
`verify_files(run_dir, outputs)` checks the stored files by sha256.
"""

from __future__ import annotations

import os
from pathlib import Path

from prestage.stages import errors, names
from prestage.stages.base import Context, Stage, StageResult, opt
from prestage.stages.manifest import Manifest
from prestage.stages.records import record_of
from prestage.stages.tokenize_prep import store
from prestage.stages.tokenize_prep.chat_template import template_input
from prestage.stages.tokenize_prep.source import MODES, normalize_tokenizer_arg


def _mode(params: dict) -> str:
    mode = str(params.get("tokenizer_mode") or "auto").strip().lower()
    if mode not in MODES:
        raise errors.UsageError(
            f"--tokenizer-mode {params.get('tokenizer_mode')!r}: not supported; use one of {', '.join(MODES)}"
        )
    return mode


class TokenizePrepStage(Stage):
    name = "tokenize-prep"
    version = 3  # 2: typed record; generation_defaults always present; configure required; 3: remote_code
    requires = ("resolve", "configure")
    options = (
        opt(
            "--tokenizer",
            default=None,
            metavar="NAME_OR_PATH",
            help="Tokenizer hub id or local folder (default: the model's own tokenizer).",
        ),
        opt(
            "--tokenizer-revision",
            default=None,
            metavar="REV",
            help="Branch, tag or commit of --tokenizer (default: the model's --revision).",
        ),
        opt(
            "--tokenizer-mode",
            default="auto",
            metavar="MODE",
            show_default=True,
            help="auto | hf | mistral. auto picks mistral for repos with consolidated*.safetensors and "
            "tekken.json or tokenizer.model.v*, else hf.",
        ),
        opt(
            "--trust-remote-code",
            is_flag=True,
            default=False,
            help="Allow the repo's own Python code (auto_map) to run for its config and tokenizer.",
        ),
        opt(
            "--chat-template",
            default=None,
            metavar="FILE_OR_JINJA",
            help="Chat template: a Jinja file, a literal template, or the name of one of the tokenizer's "
            "templates (default: the tokenizer's own).",
        ),
    )

    def check_params(self, params: dict) -> None:
        _mode(params)
        template_input(params.get("chat_template"))
        if params.get("tokenizer_revision") is not None:
            names.revision(params["tokenizer_revision"], "--tokenizer-revision")

    def inputs(self, params: dict, upstream: dict[str, Manifest]) -> dict:
        resolve = upstream["resolve"].record
        mode = _mode(params)
        tok = normalize_tokenizer_arg(params.get("tokenizer"), resolve)
        if tok["kind"] == "local":
            run_dir = Path(params.get("run_dir") or ".").resolve()
            folder = Path(tok["value"]).expanduser().resolve()
            tok["local_dir"] = Path(os.path.relpath(folder, run_dir)).as_posix()
        return {
            "tokenizer": tok,
            "tokenizer_revision": params.get("tokenizer_revision") or None,
            "tokenizer_mode": mode,
            "trust_remote_code": bool(params.get("trust_remote_code")),
            "chat_template": template_input(params.get("chat_template")),
        }

    def run(self, ctx: Context, inputs: dict) -> StageResult:
        from prestage.stages.tokenize_prep.prepare import prepare

        return prepare(ctx, inputs)

    def check_outputs(self, run_dir: Path, manifest: Manifest, params: dict | None = None) -> str | None:
        return store.check_outputs(run_dir, record_of(manifest))
