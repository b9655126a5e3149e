"""Running a test file's Triton kernel tests on CPU through Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, and it changes every kernel decorated afterwards,
so such a file's launcher test reruns the whole file in a subprocess with the variable set; its kernel tests
(marked needs_interpreter) run there and skip in the outer pytest process.
"""
import os
import re
import subprocess
import sys

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs inside the TRITON_INTERPRET=1 subprocess")


def run_under_interpreter(test_file: str, *pytest_args: str, timeout: float = 900) -> str:
    """pytest's output for test_file (with pytest_args) run under TRITON_INTERPRET=1; asserts that it passed."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, test_file],
                            env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return result.stdout


def rerun_under_interpreter(test_file: str, passed: int, timeout: float = 900, pytest_args: tuple = (),
                            launcher_skips: bool = True) -> None:
    """Runs test_file (with pytest_args) under TRITON_INTERPRET=1 and asserts that exactly `passed` tests passed
    there and, with `launcher_skips`, that only the launcher itself skipped, so a kernel test that silently skips
    fails the launcher (a run that selects with -k deselects the launcher instead)."""
    if INTERPRETED:
        pytest.skip("already inside the interpreter run")
    stdout = run_under_interpreter(test_file, *pytest_args, timeout=timeout)
    summary = rf"\b{passed} passed, 1 skipped\b" if launcher_skips else rf"\b{passed} passed\b"
    assert re.search(summary, stdout), stdout[-2000:]
