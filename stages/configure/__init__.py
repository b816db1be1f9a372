"""The configure stage: build the model's config and decide as vLLM does (see stage.py for the module map)."""

from prestage.stages.configure.decisions import GPU_CAPABILITY, configure
from prestage.stages.configure.stage import ConfigureStage

__all__ = ["GPU_CAPABILITY", "ConfigureStage", "configure"]
