"""`oryx` run in-process, for tests that check exit statuses and error lines."""
import contextlib
import io

from oryx_core.cli import main


def run(argv) -> tuple[int, str]:
    """cli.main in-process: (exit status, stderr); an argparse refusal's SystemExit gives its status."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()
