"""The fetch-weights stage (package): select, download, verify and index a model's weight files.

select.py             which files a --load-format picks (vLLM's rules, pure)
download.py           hub downloads: lock, disk check, parallel resumable fetch, progress
verify.py             sha256 hashing on a thread pool
tensors.py            the tensor index (headers parsed by stages/safetensors.py), its checks against configure's
                      spec, dummy shapes
npcache.py            the numpy cache for --load-format npcache
fetch.py              the stage's run(): the steps above in order
stage.py              FetchWeightsStage: options, inputs, check_outputs
"""

from prestage.stages.fetch_weights.stage import FetchWeightsStage

__all__ = ["FetchWeightsStage"]
