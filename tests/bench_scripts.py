"""Test helper: a script of bench/ imported as a module (bench/ is no package, and its scripts import each other)."""
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench_script(name: str):
    """bench/NAME.py as a fresh module. bench/ is on sys.path only while it loads, and the sibling scripts it
    imported leave sys.modules again, so that bench/'s module names (plots, ...) never shadow experiments/'s."""
    before = set(sys.modules)
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
        for loaded in set(sys.modules) - before:
            origin = getattr(sys.modules[loaded], "__file__", None) or ""
            if Path(origin).parent == BENCH:
                del sys.modules[loaded]
    return module
