"""Shared fixtures: real broker and store processes live in tests/support."""

import signal

pytest_plugins = ["tests.support.procs", "tests.support.agent_fixtures"]

# A run started in the background of a non-interactive shell (`make test &`, a CI runner's
# detached job) inherits SIGINT ignored, and so would every program the tests start: the tests
# that stop an example or the agent with Ctrl-C then waited 30 s for a program that never saw
# it. Handled here (not ignored), it is back to its default in every program started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
