"""fetch-weights' pure parts: file selection (docs/vllm-rules.md, weight cases on listings), hashing, and the
tensor-index checks against configure's spec (safetensors header parsing is tested in test_safetensors.py)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from prestage.stages.errors import InvalidModelError, UnsupportedError, UsageError
from prestage.stages.fetch_weights import selection as sel
from prestage.stages.fetch_weights.tensors import check_spec, merge, param_count
from prestage.stages.fetch_weights.verify import hash_files, sha256_file
from prestage.stages.records import ModelSpec

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
INDEX = {"metadata": {}, "weight_map": {"a": SHARDS[0], "b": SHARDS[1]}}


def test_W01_W02_safetensors_win_over_bin():
    s = sel.select("auto", ["config.json", "model.safetensors", "pytorch_model.bin"])
    assert (s.format, s.files) == ("safetensors", ["model.safetensors"])


def test_W03_hf_format_index_keeps_only_indexed_shards():
    paths = ["config.json", *SHARDS, sel.SAFE_INDEX, "consolidated.safetensors"]
    assert sel.index_needed("hf", paths) == sel.SAFE_INDEX
    s = sel.select("hf", paths, index=INDEX)
    assert s.format == "safetensors" and s.files == SHARDS and s.index == sel.SAFE_INDEX
    assert s.skipped == [{"path": "consolidated.safetensors", "why": f"not in {sel.SAFE_INDEX}"}]


def test_W04_auto_prefers_consolidated_as_mistral():
    paths = ["config.json", *SHARDS, sel.SAFE_INDEX, "consolidated.safetensors"]
    assert sel.index_needed("auto", paths) is None  # no consolidated index in this repo
    s = sel.select("auto", paths, index=None)
    assert (s.format, s.files) == ("mistral", ["consolidated.safetensors"])
    # a consolidated file anywhere (basename match, recursive) flips auto to mistral
    assert sel.resolve_format("auto", ["sub/consolidated.00.safetensors"]) == "mistral"


def test_W05_safetensors_format_filters_consolidated_with_index():
    s = sel.select("safetensors", [*SHARDS, sel.SAFE_INDEX, "consolidated.safetensors"], index=INDEX)
    assert s.files == SHARDS


def test_W06_index_names_a_missing_shard():
    index = {"weight_map": {"a": SHARDS[0], "c": "model-00003-of-00003.safetensors"}}
    with pytest.raises(InvalidModelError, match="model-00003-of-00003.safetensors"):
        sel.select("safetensors", [*SHARDS, sel.SAFE_INDEX], index=index)


def test_W07_shards_without_index_load_in_natural_order():
    paths = ["model-10.safetensors", "model-2.safetensors", "model-1.safetensors"]
    s = sel.select("auto", paths)
    assert s.files == ["model-1.safetensors", "model-2.safetensors", "model-10.safetensors"]


def test_W08_bin_pattern_drops_training_leftovers():
    s = sel.select("auto", ["pytorch_model.bin", "training_args.bin", "optimizer.pt"])
    assert (s.format, s.files) == ("pt", ["pytorch_model.bin"])
    assert [x["path"] for x in s.skipped] == ["training_args.bin"]


@pytest.mark.parametrize(
    "fmt,paths,hint",
    [
        ("pt", ["config.json", "pytorch_model.bin"], "try --load-format hf"),  # W-09
        ("safetensors", ["config.json", "pytorch_model.bin"], "try --load-format hf"),  # W-10
        ("auto", ["config.json", "model.pth"], "no loadable weights"),  # W-11
        ("hf", ["config.json", "model.ckpt"], "no loadable weights"),  # W-11
    ],
)
def test_W09_W10_W11_no_weights_for_format(fmt, paths, hint):
    with pytest.raises(UnsupportedError) as e:
        sel.select(fmt, paths, model="org/m")
    msg = str(e.value)
    assert "Cannot find any model weights" in msg and f"'{fmt}'" in msg and "org/m" in msg
    assert paths[1] in msg and hint in msg


def test_W12_original_folder_ignored_by_default():
    paths = ["model.safetensors", "original/consolidated.00.pth", "original/params.json"]
    s = sel.select("auto", paths)
    assert (s.format, s.files) == ("safetensors", ["model.safetensors"])
    # huggingface_hub's fnmatch semantics: original/**/* needs a deeper path; a trailing "/" means the folder
    assert sel._ignored("original/sub/x.pth", sel.DEFAULT_IGNORE)
    assert not sel._ignored("original/params.json", sel.DEFAULT_IGNORE)
    assert sel._ignored("original/params.json", ["original/"])


def test_ignore_patterns_apply_and_top_level_only():
    paths = ["model.safetensors", "extra.safetensors", "sub/x.safetensors"]
    assert sel.select("auto", paths, ignore_patterns=["extra.*"]).files == ["model.safetensors"]
    assert sel.select("auto", paths, ignore_patterns=["Extra.*"]).files == ["extra.safetensors", "model.safetensors"]


def test_W13_dummy_selects_nothing():
    s = sel.select("DUMMY", ["model.safetensors"])
    assert (s.load_format, s.format, s.files) == ("dummy", "dummy", [])


def test_W14_npcache_takes_bin_then_pt():
    assert sel.select("npcache", ["model.safetensors", "pytorch_model.bin"]).files == ["pytorch_model.bin"]
    assert sel.select("npcache", ["w.pt"]).format == "npcache"


def test_W19_unknown_load_format():
    with pytest.raises(UsageError, match="--load-format 'foo': not a load format; use one of auto, hf"):
        sel.normalize_load_format("foo")
    assert sel.normalize_load_format("SafeTensors") == "safetensors"


def test_index_without_weight_map_is_invalid():
    with pytest.raises(InvalidModelError, match="weight_map"):
        sel.select("hf", [*SHARDS, sel.SAFE_INDEX], index={"metadata": {}})


# ---- hashing -----------------------------------------------------------------------------------------


def test_hash_files_matches_hashlib_across_chunk_boundaries(tmp_path):
    blobs = {f"f{i}": bytes(range(256)) * (i * 4099 + 1) for i in range(5)}
    paths = []
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    assert sha256_file(paths[3], chunk=1000) == (len(blobs["f3"]), hashlib.sha256(blobs["f3"]).hexdigest())
    got = hash_files(paths, workers=3)
    for p in paths:
        data = blobs[p.name]
        assert got[p] == (len(data), hashlib.sha256(data).hexdigest())


# ---- tensor index vs spec ----------------------------------------------------------------------------


def _index(n_layers, vocab=16, hidden=4, head=True):
    t = {"model.embed_tokens.weight": {"file": "a", "dtype": "F32", "shape": [vocab, hidden]}}
    for i in range(n_layers):
        t[f"model.layers.{i}.mlp.up_proj.weight"] = {"file": "a", "dtype": "F32", "shape": [8, hidden]}
    if head:
        t["lm_head.weight"] = {"file": "a", "dtype": "F32", "shape": [vocab, hidden]}
    return t


SPEC = ModelSpec(
    model_type="llama",
    num_hidden_layers=3,
    hidden_size=4,
    intermediate_size=8,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=4,
    vocab_size=16,
    tie_word_embeddings=False,
    sliding_window=None,
    layer_types=None,
    rope=None,
    rms_norm_eps=1e-6,
    attention_bias=False,
    o_proj_bias=False,
    mlp_bias=False,
    qk_norm=False,
    hidden_act="silu",
    max_position_embeddings=64,
    num_experts=None,
    weight_dtype="float32",
    param_count=None,
    weight_bytes=None,
)


def test_spec_check_passes_and_counts():
    t = _index(3)
    assert check_spec(t, SPEC, {}) == []
    assert param_count(t) == 16 * 4 * 2 + 3 * 32


@pytest.mark.parametrize("layers,msg", [(2, "layers 2 missing"), (4, "layers 3 not in the config")])
def test_spec_check_layer_mismatch(layers, msg):
    with pytest.raises(InvalidModelError, match=msg):
        check_spec(_index(layers), SPEC, {}, where="org/m")


def test_spec_check_mtp_layers_allowed_by_config():
    assert check_spec(_index(4), SPEC, {"num_nextn_predict_layers": 1}) == []


def test_spec_check_embed_shape():
    with pytest.raises(InvalidModelError, match=r"model.embed_tokens.weight has shape \[32, 4\]"):
        check_spec(_index(3, vocab=32), SPEC, {})


def test_spec_check_tied_head_warnings():
    assert "unties" in check_spec(_index(3), dataclasses.replace(SPEC, tie_word_embeddings=True), {})[0]
    assert "no lm_head" in check_spec(_index(3, head=False), SPEC, {})[0]


def test_merge_rejects_duplicate_tensor():
    with pytest.raises(InvalidModelError, match="both a and b"):
        merge([{"x": {"file": "a"}}, {"x": {"file": "b"}}])
