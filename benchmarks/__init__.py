"""Benchmarks of kore-session-gateway: `python -m benchmarks` (see benchmarks/__main__.py)."""
