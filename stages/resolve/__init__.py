"""The resolve stage: find the model, pin its revision, record its file listing (see stage.py)."""

from prestage.stages.resolve.stage import ResolveStage, detect_format, is_local

__all__ = ["ResolveStage", "detect_format", "is_local"]
