"""Fixtures shared by the test files."""

import signal

import pytest


@pytest.fixture
def python_sigint():
    """Ctrl-C (SIGINT) raises KeyboardInterrupt, here and in the processes a test starts.

    A shell without job control starts background commands (``nohup pytest ... &``) with SIGINT
    ignored, and an ignored signal stays ignored in child processes; a signal with a handler is
    reset to its default at ``exec``, so that a Python child installs its own handler again. The
    handler in place before is restored afterwards.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
