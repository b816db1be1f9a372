"""prestage's stages, in pipeline order, loaded lazily by name.

    resolve -> configure -> tokenize-prep -> fetch-weights -> launch

`STAGES` maps a stage name to "module:Class"; `get_stage(name)` imports only that module. The runner
imports stages, never the reverse.
"""

from __future__ import annotations

import importlib

STAGES: dict[str, str] = {
    "resolve": "prestage.stages.resolve:ResolveStage",
    "configure": "prestage.stages.configure:ConfigureStage",
    "tokenize-prep": "prestage.stages.tokenize_prep:TokenizePrepStage",
    "fetch-weights": "prestage.stages.fetch_weights:FetchWeightsStage",
    "launch": "prestage.stages.launch:LaunchStage",
}
ORDER: tuple[str, ...] = tuple(STAGES)


def get_stage(name: str):
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)()
