"""`python -m oryx_core ...` runs the `oryx` command line (what subprocesses and `torchrun -m` launch)."""
import sys

from oryx_core.cli import main

sys.exit(main())
