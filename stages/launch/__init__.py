"""The launch stage: run the staged model on prestage's engine (see stage.py for the module map)."""

from prestage.stages.launch.completions import DEFAULT_PROMPT, read_prompts
from prestage.stages.launch.sampling_defaults import generation_config_mode, generation_defaults, given
from prestage.stages.launch.stage import OPTIONS, LaunchStage

__all__ = [
    "DEFAULT_PROMPT",
    "OPTIONS",
    "LaunchStage",
    "generation_config_mode",
    "generation_defaults",
    "given",
    "read_prompts",
]
