"""Test helper: a script of bench/ imported as a module (bench/ is no package, and its scripts import each other)."""
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench_script(name: str):
    """bench/NAME.py as a fresh module; bench/ goes on sys.path so that its imports of sibling scripts resolve."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
