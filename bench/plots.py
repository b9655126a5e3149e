"""The figure of docs/benchmarks.md, drawn from a raw result of bench/bench_layer_decode.py.

    python3 bench/plots.py --layer-decode bench/results/bench_layer_decode_2026-11-27_h100.json \
        --figure docs/figures/decode_h100.png

Left: batch-1 decode time per token (CUDA graphs) against the context length, per mixer and mode.
Right: peak GPU memory of generation with the KV cache kept or dropped. Needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

MIXER_LABELS = {"gdn": "Oryx-GDN", "mamba2": "Oryx-Mamba-2"}
MIXER_COLORS = {"gdn": "tab:blue", "mamba2": "tab:red"}


def decode_series(result: dict) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """{(mixer, mode): [(context, ms per token), ...]} from the 'decode' part, contexts ascending."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for key, row in result["decode"].items():
        match = re.fullmatch(r"(\w+)/ctx(\d+)", key)
        if match is None:  # summary entries such as 'gdn/recurrent_ratio_last_vs_first'
            continue
        mixer, context = match.group(1), int(match.group(2))
        for mode in ("recurrent", "attention"):
            series.setdefault((mixer, mode), []).append((context, row[f"{mode}_graph_ms"]))
    return {key: sorted(points) for key, points in series.items()}


def memory_series(result: dict) -> dict[str, list[tuple[int, float]]]:
    """{kv policy: [(context, peak MiB), ...]} from the 'memory' part, contexts ascending."""
    series: dict[str, list[tuple[int, float]]] = {}
    for key, row in result["memory"].items():
        match = re.fullmatch(r"ctx(\d+)/(\w+)", key)
        if match is None:  # 'weights_MiB'
            continue
        series.setdefault(match.group(2), []).append((int(match.group(1)), row["peak_MiB"]))
    return {key: sorted(points) for key, points in series.items()}


def decode_figure(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for (mixer, mode), points in sorted(decode_series(result).items()):
        left.plot([c for c, _ in points], [ms for _, ms in points], marker="o", color=MIXER_COLORS.get(mixer),
                  linestyle="-" if mode == "recurrent" else "--", label=f"{MIXER_LABELS.get(mixer, mixer)}, {mode}")
    left.set(xscale="log", xlabel="context (tokens)", ylabel="ms per token", ylim=(0, None),
             title="decode, batch 1, 125m preset, CUDA graphs")
    left.set_xticks([1024, 4096, 16384, 32768], ["1K", "4K", "16K", "32K"])
    left.legend(fontsize=8)
    for policy, points in sorted(memory_series(result).items()):
        right.plot([c for c, _ in points], [mib for _, mib in points], marker="o", label=f"KV cache {policy}")
    right.axhline(result["memory"]["weights_MiB"], color="grey", linewidth=0.8, label="weights")
    right.set(xscale="log", xlabel="context (tokens)", ylabel="peak MiB", ylim=(0, None),
              title="generation, Oryx-GDN, recurrent plan")
    right.set_xticks([1024, 4096, 16384, 32768], ["1K", "4K", "16K", "32K"])
    right.legend(fontsize=8)
    fig.suptitle(f"{result['env']['device']}, {result['env']['date'][:10]}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer-decode", type=Path, required=True, help="a bench_layer_decode.py JSON result")
    parser.add_argument("--figure", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    decode_figure(json.loads(args.layer_decode.read_text()), args.figure)


if __name__ == "__main__":
    main()
