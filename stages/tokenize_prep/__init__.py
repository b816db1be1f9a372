"""The tokenize-prep stage: load, store and record the model's tokenizer (see stage.py for the module map)."""

from prestage.stages.tokenize_prep.cached import cached_tokenizer, load_stored_tokenizer
from prestage.stages.tokenize_prep.golden import check_golden
from prestage.stages.tokenize_prep.stage import TokenizePrepStage
from prestage.stages.tokenize_prep.store import verify_files

__all__ = ["TokenizePrepStage", "cached_tokenizer", "check_golden", "load_stored_tokenizer", "verify_files"]
