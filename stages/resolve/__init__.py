"""The resolve stage: find the model, pin its revision, record its file listing (see stage.py)."""

from prestage.stages.resolve.lookup import detect_format, is_local
from prestage.stages.resolve.stage import ResolveStage

__all__ = ["ResolveStage", "detect_format", "is_local"]
