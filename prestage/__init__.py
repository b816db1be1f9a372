"""prestage: prepare a Hugging Face language model for inference as resumable stages, then run it.

The code lives in two folders at the top of the repository, installed under this namespace:
`stages/` as `prestage.stages` (the five stages and what they share) and `runner/` as `prestage.runner`
(the command line, chaining, inspect, status, verify). Nothing generic lands at the top of site-packages.
"""
