"""Benchmarks of mqtt-presence, run as ``python -m bench.<name>``."""
