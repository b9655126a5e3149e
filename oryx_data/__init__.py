"""Training data for Oryx: text corpora tokenised into memory-mapped shards (`oryx data`), read back by `TokenShards`.

The pipeline lives in `oryx_data.pipeline`; its command line in `oryx_data.cli`.
"""
from .pipeline import (Document, TokenShards, build_shards, gpt2_tokenizer, gpt2_tokenizer_from_files,
                       iter_documents, read_meta, split_text, train_tokenizer)

__all__ = ["Document", "TokenShards", "build_shards", "gpt2_tokenizer", "gpt2_tokenizer_from_files",
           "iter_documents", "read_meta", "split_text", "train_tokenizer"]
