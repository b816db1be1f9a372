"""The tokenize-prep stage (docs/vllm-rules.md §4, cases T-01..T-09) on local folders and the
local hub: the stored tokenizer, its cached attributes, chat template, golden encodings and the errors."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import pytest

from prestage.runner.chain import run_stage
from prestage.stages import errors
from prestage.stages.base import Reporter
from prestage.stages.manifest import read
from prestage.stages.records import TokenizerRecord
from prestage.stages.tokenize_prep import check_golden, load_stored_tokenizer, verify_files
from prestage.stages.tokenize_prep.cached import cached_attributes

QUIET = Reporter(quiet=True)


def _prep(run_dir: Path, model, force=True, **params):
    """Run resolve, configure then tokenize-prep in-process on `model`; return tokenize-prep's manifest."""
    params = {"model": str(model), **params}
    run_stage("resolve", run_dir, params, QUIET, force=force)
    run_stage("configure", run_dir, params, QUIET, force=force)
    return run_stage("tokenize-prep", run_dir, params, QUIET, force=force).manifest


@pytest.fixture
def model_copy(checkpoint_dirs, tmp_path):
    """A writable copy of the single-layout tiny checkpoint (weights left out: the tokenizer needs none)."""
    dst = tmp_path / "model"
    shutil.copytree(checkpoint_dirs["single"], dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---- round trip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_roundtrip_each_layout_stores_tokenizer_and_cached_attributes(checkpoint_dirs, tmp_path, layout):
    from transformers import AutoTokenizer

    run = tmp_path / "run"
    m = _prep(run, checkpoint_dirs[layout])
    out = m.outputs
    fresh = AutoTokenizer.from_pretrained(checkpoint_dirs[layout])
    assert out["source"] == "model" and out["mode"] == "hf" and out["is_fast"] is True
    assert out["len"] == len(fresh) == 1024 and out["vocab_size"] == fresh.vocab_size == 1021
    assert out["all_special_ids"] == fresh.all_special_ids and out["max_token_id"] == 1023
    assert out["added_vocab"] == {"<|endoftext|>": 1021, "<|im_start|>": 1022, "<|im_end|>": 1023}
    # eos: the tokenizer's <|im_end|> first, then generation_config's [eos, bos] without duplicates
    assert out["eos_token_ids"] == [1023, 1021] and out["pad_token_id"] == 1021 and out["bos_token_id"] is None
    assert out["model_vocab_size"] == 1024 and out["max_valid_id"] == 1023 and m.warnings == []
    assert out["chat_template"]["source"] == "tokenizer"
    assert [g["name"] for g in out["golden"]] == ["ascii", "code", "cjk", "emoji", "chat"]
    assert out["golden"][-1]["text"].endswith("<|im_start|>assistant\n")
    assert (
        out["tokenizer_json_sha256"]
        == hashlib.sha256((checkpoint_dirs[layout] / "tokenizer.json").read_bytes()).hexdigest()
    )
    stored = {f["path"] for f in out["files"]}
    assert {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"} <= stored
    assert all((run / p).is_file() for p in stored)
    assert "vocab" not in out  # the whole vocabulary stays out of the manifest

    tok = load_stored_tokenizer(run, TokenizerRecord.from_dict(out))
    assert type(tok).__name__.startswith("Cached") and isinstance(tok, type(fresh))
    assert len(tok) == 1024 and tok.max_token_id == 1023 and tok.all_special_ids == out["all_special_ids"]
    assert tok.get_vocab() is tok.get_vocab() and tok.get_vocab() == fresh.get_vocab()
    assert tok.name_or_path == str(checkpoint_dirs[layout])
    for g in out["golden"][:4]:
        assert tok.encode(g["text"]) == fresh.encode(g["text"]) == g["ids"]
    check_golden(tok, TokenizerRecord.from_dict(out))
    verify_files(run, TokenizerRecord.from_dict(out))
    again = pickle.loads(pickle.dumps(tok))
    assert type(again).__name__ == type(tok).__name__ and len(again) == 1024


def test_same_inputs_give_byte_identical_manifest(model_copy, tmp_path):
    run = tmp_path / "run"
    first = _prep(run, model_copy)
    second = _prep(run, model_copy)
    assert first.to_dict().keys() == second.to_dict().keys()
    assert first.stable() == second.stable()
    assert first.volatile["tokenizer_folder"] == str(model_copy.resolve())


def test_cached_run_skips_and_missing_file_reruns(model_copy, tmp_path):
    from prestage.stages.tokenize_prep import TokenizePrepStage

    run = tmp_path / "run"
    m = _prep(run, model_copy)
    params = {"model": str(model_copy)}
    assert run_stage("tokenize-prep", run, params, QUIET).status == "cached"
    stage = TokenizePrepStage()
    (run / "tokenizer" / "tokenizer_config.json").unlink()
    assert stage.check_outputs(run, m) == "tokenizer/tokenizer_config.json is missing"
    assert run_stage("tokenize-prep", run, params, QUIET).status == "ran"
    with open(run / "tokenizer" / "tokenizer.json", "ab") as fh:
        fh.write(b" ")
    assert "bytes, recorded" in stage.check_outputs(run, read(run / "tokenize-prep.msgpack"))


def test_verify_files_catches_same_size_change(model_copy, tmp_path):
    run = tmp_path / "run"
    out = _prep(run, model_copy).outputs
    path = run / "tokenizer" / "tokenizer_config.json"
    data = bytearray(path.read_bytes())
    data[data.index(b"tokenizers")] = ord("T")  # same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(errors.IntegrityError, match="tokenizer_config.json sha256 differs"):
        verify_files(run, TokenizerRecord.from_dict(out))


def test_check_golden_names_first_changed_string(model_copy, tmp_path):
    run = tmp_path / "run"
    out = _prep(run, model_copy).outputs
    tok = load_stored_tokenizer(run, TokenizerRecord.from_dict(out))
    changed = json.loads(json.dumps(out))
    changed["golden"][1]["ids"][3] += 1
    with pytest.raises(errors.IntegrityError, match=r"golden string 'code' .*position 3"):
        check_golden(tok, TokenizerRecord.from_dict(changed))


# ---- tokenizer cases (docs/vllm-rules.md) ----------------------------------------------------------------------


def test_T06_max_token_id_covers_added_tokens_beyond_vocab_size(model_copy, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_copy)
    tok.add_tokens(["<extra_a>", "<extra_b>", "<extra_c>", "<extra_d>"])  # ids 1024..1027: beyond vocab_size
    tok.save_pretrained(model_copy)
    out = (m := _prep(tmp_path / "run", model_copy)).outputs
    assert out["vocab_size"] == 1021 and out["len"] == 1028
    assert out["max_token_id"] == 1027  # the larger of max(get_vocab ids) and vocab_size - 1
    assert out["model_vocab_size"] == 1024 and out["max_valid_id"] == 1027
    assert any("ids up to 1027 but the model embeds only 1024" in w for w in m.warnings)
    assert out["added_vocab"]["<extra_d>"] == 1027


def test_T06_max_token_id_takes_vocab_size_when_larger():
    class Sized:  # a tokenizer whose vocab_size counts ids missing from get_vocab() (Qwen-style)
        vocab_size = 151_936
        all_special_ids, all_special_tokens, is_fast = [5], ["<s>"], True

        def __len__(self):
            return 151_665

    attrs = cached_attributes(Sized(), {"a": 0, "<s>": 5, "ab": 151_664})
    assert attrs["max_token_id"] == 151_935 and attrs["max_chars_per_token"] == 3


def test_T07_no_chat_template_is_none_with_warning(model_copy, tmp_path):
    (model_copy / "chat_template.jinja").unlink()
    _edit_json(model_copy / "config.json", model_type="llama", architectures=["LlamaForCausalLM"])
    m = _prep(tmp_path / "run", model_copy)
    assert m.outputs["chat_template"] is None
    assert [g["name"] for g in m.outputs["golden"]] == ["ascii", "code", "cjk", "emoji"]
    assert any("no chat template" in w for w in m.warnings)
    tok = load_stored_tokenizer(tmp_path / "run", TokenizerRecord.from_dict(m.outputs))
    assert tok.chat_template is None


def test_T08_builtin_fallback_model_type_is_named_in_warning(model_copy, tmp_path):
    (model_copy / "chat_template.jinja").unlink()
    _edit_json(model_copy / "config.json", model_type="siglip")
    m = _prep(tmp_path / "run", model_copy)
    assert m.outputs["chat_template"] is None
    assert any("template_basic.jinja" in w and "siglip" in w for w in m.warnings)


def _custom_tokenizer(model_copy: Path, model_type: str = "tiny_custom") -> Path:
    """A tokenizer folder beside the model whose class is the repo's own (auto_map) and whose config names a
    model type transformers lacks; passed as --tokenizer, so configure still builds the (unchanged) model."""
    folder = shutil.copytree(model_copy, model_copy.parent / "custom-tokenizer")
    _edit_json(
        folder / "tokenizer_config.json",
        tokenizer_class="TinyCustomTokenizer",
        auto_map={"AutoTokenizer": [None, "tiny_tok.TinyCustomTokenizer"]},
    )
    _edit_json(folder / "config.json", model_type=model_type)
    (folder / "tiny_tok.py").write_text(
        '"""A repo-provided tokenizer class."""\nfrom transformers import TokenizersBackend\n\n\n'
        "class TinyCustomTokenizer(TokenizersBackend):\n    pass\n"
    )
    return folder


def test_T03_custom_tokenizer_class_needs_trust_remote_code(model_copy, tmp_path):
    tok_dir = _custom_tokenizer(model_copy)
    with pytest.raises(errors.UntrustedCodeError) as e:
        _prep(tmp_path / "run", model_copy, tokenizer=str(tok_dir))
    msg = str(e.value)
    assert "tiny_tok.TinyCustomTokenizer" in msg and "--trust-remote-code" in msg and "\n" not in msg
    assert e.value.exit_code == errors.CODE["untrusted-code"]

    run = tmp_path / "trusted"
    out = _prep(run, model_copy, trust_remote_code=True, tokenizer=str(tok_dir)).outputs
    assert out["class"] == "TinyCustomTokenizer" and out["trust_remote_code"] is True
    tok = load_stored_tokenizer(run, TokenizerRecord.from_dict(out))
    assert type(tok).__name__ == "CachedTinyCustomTokenizer"
    check_golden(tok, TokenizerRecord.from_dict(out))
    # the code that ran is recorded by sha256, as configure records its remote config code
    import hashlib

    digest = hashlib.sha256((tok_dir / "tiny_tok.py").read_bytes()).hexdigest()
    assert out["remote_code"] == {
        "auto_map": "tiny_tok.TinyCustomTokenizer",
        "files": [{"path": "tiny_tok.py", "sha256": digest}],
    }


def test_T03_custom_class_with_a_known_model_type_loads_the_builtin_class_untrusted(model_copy, tmp_path):
    # As transformers 5 (and so vLLM): a known model type counts as local code, so the repo code is not run
    tok_dir = _custom_tokenizer(model_copy, model_type="qwen2")
    m = _prep(tmp_path / "run", model_copy, tokenizer=str(tok_dir))
    out = m.outputs
    assert out["class"] == "TokenizersBackend" and out["trust_remote_code"] is False  # not the repo class
    # same outcome as vLLM, but said: the repo's code did not run and the encodings may differ from its class
    assert out["remote_code"] is None
    assert any("tiny_tok.TinyCustomTokenizer" in w and "did not run" in w for w in m.warnings), m.warnings


def test_T02_consolidated_weights_with_only_tokenizer_json_use_hf(model_copy, tmp_path):
    (model_copy / "consolidated.safetensors").write_bytes(b"\0" * 16)
    out = _prep(tmp_path / "run", model_copy).outputs
    assert out["mode"] == "hf" and out["mode_reason"] == "auto" and out["class"] != "MistralCommonBackend"


def test_T01_mistral_repo_selects_mistral_mode(model_copy, tmp_path):
    (model_copy / "consolidated.safetensors").write_bytes(b"\0" * 16)
    (model_copy / "tekken.json").write_text("{}")
    if importlib.util.find_spec("mistral_common") is None:
        with pytest.raises(errors.UnsupportedError, match="pip install mistral-common"):
            _prep(tmp_path / "run", model_copy)
        with pytest.raises(errors.UnsupportedError, match="pip install mistral-common"):
            _prep(tmp_path / "run2", model_copy, tokenizer_mode="MISTRAL")
    else:  # mistral_common present: auto picks mistral; this tekken.json is a stub, so loading fails cleanly
        with pytest.raises(errors.InvalidModelError, match="Mistral tokenizer failed to load"):
            _prep(tmp_path / "run", model_copy)
    # --tokenizer-mode hf overrides the auto rule
    assert _prep(tmp_path / "run3", model_copy, tokenizer_mode="hf").outputs["mode"] == "hf"


def test_T09_chat_template_that_looks_like_a_path_is_usage_error(model_copy, tmp_path):
    with pytest.raises(errors.UsageError, match=r"--chat-template tool_chat\.jinja: looks like a file path"):
        _prep(tmp_path / "run", model_copy, chat_template="tool_chat.jinja")
    with pytest.raises(errors.UsageError, match="is a directory"):
        _prep(tmp_path / "run", model_copy, chat_template=str(tmp_path))


def test_chat_template_file_and_literal_override_and_change_fingerprint(model_copy, tmp_path):
    run = tmp_path / "run"
    tpl = tmp_path / "tpl.jinja"
    tpl.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    first = _prep(run, model_copy, chat_template=str(tpl))
    ct = first.outputs["chat_template"]
    assert ct["source"] == "cli-file" and (run / ct["file"]).read_text() == tpl.read_text()
    assert first.outputs["golden"][-1]["text"] == "[user] What is 2 + 2? Answer briefly.\n"
    tok = load_stored_tokenizer(run, TokenizerRecord.from_dict(first.outputs))
    assert tok.chat_template == tpl.read_text()

    tpl.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    second = _prep(run, model_copy, chat_template=str(tpl))
    assert second.fingerprint != first.fingerprint
    assert second.outputs["golden"][-1]["text"] == "<What is 2 + 2? Answer briefly.>"

    literal = "{{ messages[0]['content'] }}!"
    third = _prep(run, model_copy, chat_template=literal)
    assert third.outputs["chat_template"]["source"] == "cli-literal" and literal not in json.dumps(third.inputs)
    assert third.outputs["golden"][-1]["text"] == "What is 2 + 2? Answer briefly.!"


def test_named_chat_templates_default_and_by_name(model_copy, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_copy)
    tok.chat_template = {"default": "D:{{ messages[0]['content'] }}", "tool_use": "T:{{ messages[0]['content'] }}"}
    tok.save_pretrained(model_copy)
    assert _prep(tmp_path / "a", model_copy).outputs["chat_template"]["source"] == "tokenizer:default"
    out = _prep(tmp_path / "b", model_copy, chat_template="tool_use").outputs
    assert out["chat_template"]["source"] == "tokenizer:tool_use" and out["golden"][-1]["text"].startswith("T:")


# ---- bad inputs -------------------------------------------------------------------------------------


def test_invalid_tokenizer_json_is_invalid_model(model_copy, tmp_path):
    (model_copy / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 5}}')
    with pytest.raises(errors.InvalidModelError, match="tokenizer.json is not a valid tokenizers file"):
        _prep(tmp_path / "run", model_copy)
    (model_copy / "tokenizer.json").write_text("{not json")
    with pytest.raises(errors.InvalidModelError, match="tokenizer.json is not a valid"):
        _prep(tmp_path / "run", model_copy)


def test_unknown_tokenizer_class_is_invalid_model_naming_it(model_copy, tmp_path):
    _edit_json(model_copy / "tokenizer_config.json", tokenizer_class="FrobnicatorTokenizer")
    with pytest.raises(errors.InvalidModelError, match="tokenizer_class 'FrobnicatorTokenizer'"):
        _prep(tmp_path / "run", model_copy)


def test_malformed_tokenizer_config_is_invalid_model(model_copy, tmp_path):
    (model_copy / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(errors.InvalidModelError, match="tokenizer_config.json is not valid JSON"):
        _prep(tmp_path / "run", model_copy)


def test_bad_tokenizer_mode_is_usage_error(model_copy, tmp_path):
    with pytest.raises(errors.UsageError, match="--tokenizer-mode 'slow': not supported; use one of auto, hf, mistral"):
        _prep(tmp_path / "run", model_copy, tokenizer_mode="slow")


def test_local_tokenizer_folder_overrides_the_model(model_copy, tmp_path, checkpoint_dirs):
    other = tmp_path / "tok"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_copy)
    tok.add_tokens(["<only_here>"])
    tok.save_pretrained(other)
    out = _prep(tmp_path / "run", model_copy, tokenizer=str(other)).outputs
    assert out["source"] == "local" and out["local_dir"] == "../tok" and out["len"] == 1025
    with pytest.raises(errors.NotFoundError, match="no such folder"):
        _prep(tmp_path / "run", model_copy, tokenizer=str(tmp_path / "missing" / "x"))


# ---- the hub ----------------------------------------------------------------------------------------


def test_T04_hub_model_tokenizer_uses_resolve_commit_and_skips_weights(hub, hf_env, tmp_path):
    run = tmp_path / "run"
    hub.reset_counters()
    out = _prep(run, "test-org/tiny-single").outputs
    commit = hub.resolve("test-org/tiny-single", "main")
    assert out["source"] == "model" and out["commit"] == commit and out["repo_id"] == "test-org/tiny-single"
    assert out["snapshot"] == f"models--test-org--tiny-single/snapshots/{commit}"
    snap = Path(hf_env["HF_HUB_CACHE"]) / out["snapshot"]
    assert (snap / "tokenizer.json").is_file() and (snap / "generation_config.json").is_file()
    assert not any(p.endswith(".safetensors") for p in hub.downloads)
    assert out["eos_token_ids"] == [1023, 1021] and out["model_vocab_size"] == 1024
    tok = load_stored_tokenizer(run, TokenizerRecord.from_dict(out))
    assert tok.name_or_path == "test-org/tiny-single"

    # offline, from the filled cache: same outputs, no request
    hub.reset_counters()
    offline = _prep(run, "test-org/tiny-single", offline=True).outputs
    assert offline == out and sum(hub.requests.values()) == 0


def test_offline_tokenizer_files_missing_from_the_cache_is_an_offline_miss(hub, hf_env, tmp_path):
    """resolve and configure online fill only config.json; tokenize-prep offline then lacks the tokenizer
    files the listing names: an offline miss naming them (exit 5), not 'no tokenizer files' (exit 9)."""
    run = tmp_path / "run"
    params = {"model": "test-org/tiny-single"}
    run_stage("resolve", run, params, QUIET, force=True)
    run_stage("configure", run, params, QUIET, force=True)
    with pytest.raises(errors.OfflineMissError, match="tokenizer.json"):
        run_stage("tokenize-prep", run, {**params, "offline": True}, QUIET, force=True)


def test_other_hub_tokenizer_is_pinned_and_goes_where_the_model_goes(hub, hf_env, tmp_path):
    run = tmp_path / "run"
    dl = tmp_path / "dl"
    out = _prep(run, "test-org/tiny-single", tokenizer="test-org/tiny-sharded", download_dir=str(dl)).outputs
    assert out["source"] == "hub" and out["repo_id"] == "test-org/tiny-sharded"
    assert out["commit"] == hub.resolve("test-org/tiny-sharded", "main") and out["revision"] == "main"
    # one cache per run (the model's, --download-dir here), so a copied run is whole; vLLM would use HF_HUB_CACHE
    assert (dl / out["snapshot"] / "tokenizer.json").is_file()
    assert not (Path(hf_env["HF_HUB_CACHE"]) / "models--test-org--tiny-sharded").exists()
    assert out["eos_token_ids"] == [1023, 1021]  # generation_config from the model repo, in --download-dir

    with pytest.raises(errors.NotFoundError, match="revision 'nope' does not exist"):
        _prep(run, "test-org/tiny-single", tokenizer="test-org/tiny-sharded", tokenizer_revision="nope")
    with pytest.raises(errors.OfflineMissError):
        _prep(run, "test-org/tiny-single", tokenizer="test-org/tiny-bin", offline=True)


# ---- the CLI ----------------------------------------------------------------------------------------


def test_cli_runs_to_tokenize_prep_and_reports_untrusted_code_in_one_line(model_copy, tmp_path, prestage):
    arts = tmp_path / "arts"
    assert prestage(["--artifacts", arts, "--run", "r1", "run", model_copy, "--to", "configure"]).rc == 0
    r = prestage(["--artifacts", arts, "tokenize-prep", "r1"])
    assert r.rc == 0, r
    assert (arts / "r1" / "tokenize-prep.msgpack").is_file() and (arts / "r1" / "tokenizer").is_dir()

    tok_dir = _custom_tokenizer(model_copy)
    r = prestage(["--artifacts", arts, "tokenize-prep", "r1", "--tokenizer", tok_dir])
    assert r.rc == errors.CODE["untrusted-code"], r
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("prestage: error:")]
    assert len(lines) == 1 and "--trust-remote-code" in lines[0]


# ---- the stored folder for plain-transformers users; order; temporaries -----------------------------------


def test_stored_tokenizer_loads_with_the_originals_behaviour(model_copy, tmp_path):
    """save_pretrained records the loader's arguments (vLLM's left truncation, the offline flags); the stored
    tokenizer_config.json drops them, so plain transformers loads the folder as it loads the original."""
    from transformers import AutoTokenizer

    run = tmp_path / "run"
    out = _prep(run, model_copy).outputs
    stored = run / "tokenizer"
    config = json.loads((stored / "tokenizer_config.json").read_text())
    assert not {"truncation_side", "local_files_only", "is_local"} & set(config)
    original = AutoTokenizer.from_pretrained(model_copy)
    plain = AutoTokenizer.from_pretrained(stored)
    assert plain.truncation_side == original.truncation_side == "right"
    assert (
        load_stored_tokenizer(run, TokenizerRecord.from_dict(out)).truncation_side == "left"
    )  # launch still truncates as vLLM does
    verify_files(run, TokenizerRecord.from_dict(out))  # the manifest lists the bytes as stored

    # an original that sets truncation_side keeps its own value
    _edit_json(model_copy / "tokenizer_config.json", truncation_side="left")
    _prep(tmp_path / "run2", model_copy)
    config = json.loads((tmp_path / "run2" / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["truncation_side"] == "left" and "local_files_only" not in config


def test_tokenize_prep_requires_configure(model_copy, tmp_path):
    run = tmp_path / "run"
    params = {"model": str(model_copy)}
    run_stage("resolve", run, params, QUIET)
    with pytest.raises(errors.StaleUpstreamError, match="needs the configure manifest"):
        run_stage("tokenize-prep", run, params, QUIET)


def test_killed_runs_tokenizer_temporaries_are_removed(model_copy, tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    stale_tmp, stale_old = run / f".tokenizer.tmp-{dead.pid}", run / f".tokenizer.old-{dead.pid}"
    live = run / f".tokenizer.tmp-{os.getppid()}"  # another live process's: kept
    for d in (stale_tmp, stale_old, live):
        d.mkdir()
        (d / "tokenizer.json").write_text("{}")
    _prep(run, model_copy)
    assert not stale_tmp.exists() and not stale_old.exists() and live.exists()
