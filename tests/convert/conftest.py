"""Fixtures of the conversion tests (the builders live in convert_helpers)."""
from __future__ import annotations

import pytest

from convert_helpers import build_hf_llama


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_llama_dir(request, tmp_path_factory):
    """(directory saved with save_pretrained(safe_serialization=True), the model) of a tiny random Llama."""
    model = build_hf_llama(tie=request.param, seed=1)
    path = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(path, safe_serialization=True)
    return path, model
