"""stages/launch/vllm_table.py is vLLM's own registry: every table equal to the installed vLLM's.

Regenerate the table with tests/vllm/write_table.py when the pinned vLLM changes (see its docstring).
"""

from __future__ import annotations

from prestage.stages.launch import registry, vllm_table
from tests.vllm.conftest import oracle


def test_table_is_the_installed_vllms():
    live = oracle("registry")
    assert live["version"] == vllm_table.VLLM_VERSION
    assert live["generate"] == vllm_table.GENERATE
    assert live["pooling"] == vllm_table.POOLING
    assert live["draft"] == vllm_table.DRAFT
    assert live["transformers_supported"] == list(vllm_table.TRANSFORMERS_SUPPORTED)
    assert live["transformers_backend"] == list(vllm_table.TRANSFORMERS_BACKEND)
    assert live["previously_supported"] == vllm_table.PREVIOUSLY_SUPPORTED
    assert live["out_of_tree"] == vllm_table.OUT_OF_TREE
    assert live["config_registry"] == list(vllm_table.CONFIG_TYPES)
    # prestage builds the config classes it claims to (the rest are refused naming vLLM)
    from prestage.stages.configure.configs import OWN_CONFIGS

    assert set(OWN_CONFIGS) <= set(live["config_registry"])
    assert registry.PREVIOUSLY_SUPPORTED == live["previously_supported"]
