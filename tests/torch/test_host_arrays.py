"""The torch backend takes read-only host arrays (broadcast views, memory maps) without torch's
"NumPy array is not writable" warning, and shares the memory of writable ones."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from oryx_torch.backend import host_tensor  # noqa: E402

SCRIPT = """
import sys, warnings
import numpy as np
warnings.simplefilter("error")  # torch's warning becomes an exception (it is otherwise shown once per process)
from oryx_core.config import preset
from oryx_core.init import init_params
from oryx_core.weights import save_checkpoint
from oryx_core.evaluate import backend_loader
from oryx_core.backend import get_backend

path = save_checkpoint(sys.argv[1], preset("tiny"), init_params(preset("tiny"), 0))
tokens = np.arange(1, 13, dtype=np.int64)[None]
tokens.setflags(write=False)
logits = backend_loader("torch")(path)(tokens, np.array([True] * 6 + [False] * 6))  # modes broadcast to [1, T]
model = get_backend("torch").load(path, device="cpu")
cache = model.make_cache(1)
modes = np.broadcast_to(np.array([True]), (1, 12))
model.prefill(cache, tokens, modes)
step = model.step(cache, tokens[:, :1][0], np.broadcast_to(np.array(False), (1,)))
print(logits.shape, tuple(step.shape))
"""


def test_read_only_host_arrays_raise_no_warning(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "tiny")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "not writable" not in done.stderr, done.stderr
    assert done.stdout.split("\n")[0].startswith("(1, 12, ")


def test_host_tensor_shares_writable_memory_and_copies_read_only():
    tokens = np.arange(6, dtype=np.int64)
    assert host_tensor(tokens, np.int64).data_ptr() == tokens.ctypes.data
    view = np.broadcast_to(np.array([True, False]), (3, 2))
    tensor = host_tensor(view, bool)
    assert tensor.data_ptr() != view.ctypes.data and tensor.tolist() == [[True, False]] * 3
