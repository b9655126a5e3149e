"""Fixtures shared by the reliability tests."""
import signal

import pytest


@pytest.fixture
def no_hang():
    """Turns a read that would block forever into a test failure after 10 s."""
    def fail(*_):
        raise TimeoutError("the reader blocked")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
