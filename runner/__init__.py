"""prestage's runner: the CLI, chaining with resume and cache, inspect, status and verify.

The runner imports stages, never the reverse.
"""
