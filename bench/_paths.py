"""Lets bench scripts import oryx_* from a plain checkout (same mapping as pyproject's package-dir)."""
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _name, _path in {
    "oryx_core": ROOT / "oryx_core",
    "oryx_cuda": ROOT / "backends" / "cuda",
    "oryx_mlx": ROOT / "backends" / "mlx",
    "oryx_convert": ROOT / "convert",
}.items():
    if _name not in sys.modules:
        _spec = importlib.util.spec_from_file_location(_name, _path / "__init__.py", submodule_search_locations=[str(_path)])
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[_name] = _module
        _spec.loader.exec_module(_module)


LAUNCHER = ("import sys; sys.path.insert(0, {bench!r}); import _paths; from oryx_core import cli; "
            "sys.exit(cli.main(sys.argv[1:]))")


def oryx_command(work: pathlib.Path) -> list:
    """`oryx` from this checkout as a command line (a launcher file written into `work`), whether or not
    the package is installed: what subprocesses and `torchrun` run on a bare GPU machine."""
    launcher = pathlib.Path(work) / "oryx_launch.py"
    launcher.write_text(LAUNCHER.format(bench=str(ROOT / "bench")))
    return [sys.executable, str(launcher)]
