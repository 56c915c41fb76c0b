"""Shared fixtures: real broker and store processes live in tests/support."""

pytest_plugins = ["tests.support.procs", "tests.support.agent_fixtures"]
