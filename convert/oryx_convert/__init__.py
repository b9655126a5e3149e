"""oryx_convert: `oryx convert` between backends and dtypes, and from Llama (HF/GGUF), fla GDN and mamba-ssm Mamba-2.

api.py (convert() and the kinds), sources.py (reading sources, taking tensors once),
gguf.py (GGUF parsing, dequantisation, RoPE rows, tokenizer), llama.py, fla_gdn.py,
mamba2.py (the family mappings), backends.py (torch / MLX containers, MLX quantisation),
cli.py (the subcommand). See docs/conversion.md.
"""
