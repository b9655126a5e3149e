"""Test set-up: import names for an uninstalled checkout, and the slow/gpu markers."""
import importlib
import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The same mapping as pyproject's package-dir, so tests run from a plain checkout too.
PACKAGE_DIRS = {
    "oryx_core": ROOT / "oryx_core",
    "oryx_cuda": ROOT / "backends" / "cuda",
    "oryx_mlx": ROOT / "backends" / "mlx",
    "oryx_convert": ROOT / "convert",
}


def _register_packages():
    for name, path in PACKAGE_DIRS.items():
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(
            name, path / "__init__.py", submodule_search_locations=[str(path)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_register_packages()
# Test modules are imported by path (--import-mode=importlib, so equal basenames in different
# folders don't clash); shared helper modules are found through these folders.
for _folder in (ROOT / "tests", *sorted(p for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name != "__pycache__")):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow")
    has_cuda = False
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        pass
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: pass --runslow"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="gpu: no CUDA device"))
