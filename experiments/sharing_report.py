"""Tables (markdown) and a figure from the JSON that experiments/sharing.py writes.

    python3 experiments/sharing_report.py experiments/results/sharing/sharing.json [MORE.json ...] [--figure docs/figures/sharing.png]

Several files (e.g. one call per mixer) are pooled: they must share the validation set and the plans, and the runs
of one mixer must all have the same step count (different mixers may differ).

Prints: the runs' settings (steps, tokens, validation set, device, date, command); per mixer and sharing the
parameter counts, throughput and held-out loss per plan (mean and sample standard deviation over seeds, and
the perplexity of the mean loss); the same-seed differences against the default sharing ("kv"), whose seeds saw
the same batches; and, per mixer and plan, the order of the three sharings. The figure: held-out loss per plan,
each seed a point and the mean a bar, one panel per mixer, and the training-loss curves.

--tables needs only the standard library; --figure needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from plots import markdown

SHARING_LABELS = {"none": "none (separate Q, K, V)", "kv": "kv (shared K, V: Oryx)", "qkv": "qkv (shared Q, K, V)"}
MIXER_LABELS = {"gdn": "Oryx-GDN", "mamba2": "Oryx-Mamba-2"}


def finished(results: dict) -> list[dict]:
    return [r for r in results["runs"] if "eval_loss" in r]


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def settings_lines(results: dict) -> list[str]:
    val = results["validation"]
    lines = []
    for part in results.get("parts", [results]):
        runs = finished(part)
        env = part.get("environment", {})
        mixers = "" if "parts" not in results else f"{', '.join(sorted({r['mixer'] for r in part['runs']}))}: "
        lines.append(f"- {mixers}{len(runs)} runs finished of {len(part['runs'])} started; {part['steps']} steps = "
                     f"{part['tokens_per_run'] / 1e6:.2f}M tokens per run; seeds "
                     f"{sorted({r['seed'] for r in runs})}; device {env.get('device', '?')}, torch {env.get('torch', '?')}, "
                     f"{env.get('date', '?')}; wall {part.get('wall_s', float('nan')):.0f} s")
    lines.append(f"- validation: {val['windows']} windows of {val['window_tokens']} tokens ({val['scored_tokens']:,} "
                 f"scored tokens of the {val['val_split_tokens']:,}-token val split), {val['placement']}, sha256 "
                 f"{val['sha256'][:12]}…")
    lines += [f"- rerun: `{part['command']}`" for part in results.get("parts", [results])]
    return lines


def summary_rows(results: dict) -> list[dict]:
    """Per (mixer, sharing) with finished runs, in the order of the runs' settings: the parameter counts and, per
    plan, the mean held-out loss over seeds (what experiments/sharing.py's summary holds)."""
    rows = []
    for mixer in dict.fromkeys(r["mixer"] for r in finished(results)):
        for sharing in [s for s in ("kv", "none", "qkv") if s in {r["sharing"] for r in finished(results)}]:
            runs = [r for r in finished(results) if (r["mixer"], r["sharing"]) == (mixer, sharing)]
            if runs:
                rows.append({"mixer": mixer, "sharing": sharing, "parameters": runs[0]["parameters"],
                             **{plan: {"loss_mean": statistics.mean(r["eval_loss"][plan] for r in runs)}
                                for plan in results["settings"]["eval_plans"]}})
    return rows


def fail(message: str):
    print(f"sharing_report.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def pooled(paths: list[str]) -> dict:
    """The files' runs in one results dict (the first file's settings; each file kept under "parts")."""
    parts = []
    for path in paths:
        try:
            parts.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            fail(f"{path}: {e}")
        if parts[-1].get("experiment") != "sharing":
            fail(f"{path}: not a sharing.json of experiments/sharing.py")
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        if part["validation"]["sha256"] != first["validation"]["sha256"]:
            fail(f"{path}: another validation set than {paths[0]}'s")
        if part["settings"]["eval_plans"] != first["settings"]["eval_plans"]:
            fail(f"{path}: plans {part['settings']['eval_plans']}, "
                             f"{paths[0]} {first['settings']['eval_plans']}")
    if len(parts) == 1:
        return first
    runs = [r for part in parts for r in part["runs"]]
    for mixer in {r["mixer"] for r in runs}:
        steps = sorted({r["steps"] for r in runs if r["mixer"] == mixer and "steps" in r})
        if len(steps) > 1:
            fail(f"the {mixer} runs of these files have different step counts "
                             f"{steps}; pool only runs of equal tokens")
    return {**first, "runs": sorted(runs, key=lambda r: (r["seed"], r["mixer"], r["sharing"])), "parts": parts}


def main_table(results: dict) -> str:
    plans = results["settings"]["eval_plans"]
    rows = []
    for row in summary_rows(results):
        p = row["parameters"]
        runs = [r for r in finished(results) if (r["mixer"], r["sharing"]) == (row["mixer"], row["sharing"])]
        cells = []
        for plan in plans:
            losses = [r["eval_loss"][plan] for r in runs]
            cells.append(f"{mean_sd(losses)} ({math.exp(statistics.mean(losses)):.2f})")
        rows.append([MIXER_LABELS.get(row["mixer"], row["mixer"]), SHARING_LABELS.get(row["sharing"], row["sharing"]),
                     f"{p['total'] / 1e6:.2f}M", f"{p['shared'] / 1e6:.2f}M",
                     f"{p['attention_mode_total'] / 1e6:.2f}M / {p['recurrent_mode_total'] / 1e6:.2f}M",
                     f"{p['tied_fraction']:.3f}", len(runs), f"{statistics.mean(r['tokens_per_s'] for r in runs) / 1e3:.0f}k",
                     *cells])
    header = ["model", "sharing", "params", "shared", "per mode (A / R)", "tied", "seeds", "train tok/s",
              *[f"loss {plan} (ppl)" for plan in plans]]
    return markdown(header, rows)


def paired_differences(results: dict) -> dict:
    """{(mixer, sharing, plan): [loss(sharing) - loss(kv) for each seed that finished both]}."""
    by = {(r["mixer"], r["sharing"], r["seed"]): r["eval_loss"] for r in finished(results)}
    diffs = {}
    for (mixer, sharing, seed), losses in by.items():
        if sharing == "kv" or (mixer, "kv", seed) not in by:
            continue
        for plan, loss in losses.items():
            diffs.setdefault((mixer, sharing, plan), []).append(loss - by[(mixer, "kv", seed)][plan])
    return diffs


def difference_table(results: dict) -> str:
    rows = []
    for (mixer, sharing, plan), d in sorted(paired_differences(results).items()):
        rows.append([MIXER_LABELS.get(mixer, mixer), sharing, plan, len(d), f"{statistics.mean(d):+.4f}",
                     f"{min(d):+.4f} … {max(d):+.4f}", f"{sum(x > 0 for x in d)} of {len(d)}"])
    return markdown(["model", "sharing", "plan", "seeds", "mean Δ loss vs kv (nats)", "range", "seeds worse than kv"],
                    rows)


def ordering_lines(results: dict) -> list[str]:
    """Per mixer and plan, the sharings from best to worst mean held-out loss."""
    lines = []
    summary = summary_rows(results)
    for row_mixer in dict.fromkeys(r["mixer"] for r in summary):
        rows = [r for r in summary if r["mixer"] == row_mixer]
        for plan in results["settings"]["eval_plans"]:
            ranked = sorted(rows, key=lambda r: r[plan]["loss_mean"])
            lines.append(f"- {MIXER_LABELS.get(row_mixer, row_mixer)}, {plan}: " + " < ".join(
                f"{r['sharing']} {r[plan]['loss_mean']:.4f}" for r in ranked))
    return lines


def figure(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    plans = results["settings"]["eval_plans"]
    mixers = list(dict.fromkeys(r["mixer"] for r in finished(results)))
    sharings = [s for s in ("none", "kv", "qkv") if any(r["sharing"] == s for r in finished(results))]
    fig, axes = plt.subplots(2, len(mixers), figsize=(6 * len(mixers), 8), squeeze=False)
    width = 0.8 / len(sharings)
    tokens_per_step = results["settings"]["seq_len"] * results["settings"]["batch_size"]
    for col, mixer in enumerate(mixers):
        ax, curves = axes[0][col], axes[1][col]
        for i, sharing in enumerate(sharings):
            runs = [r for r in finished(results) if (r["mixer"], r["sharing"]) == (mixer, sharing)]
            xs = [j + (i - (len(sharings) - 1) / 2) * width for j in range(len(plans))]
            means = [statistics.mean(r["eval_loss"][p] for r in runs) for p in plans]
            ax.bar(xs, means, width, label=SHARING_LABELS[sharing], alpha=0.6)
            for x, p in zip(xs, plans):
                ax.scatter([x] * len(runs), [r["eval_loss"][p] for r in runs], color="k", s=8, zorder=3)
            for r in runs:
                steps, losses = zip(*r["loss_curve"])
                curves.plot([s * tokens_per_step / 1e6 for s in steps], losses, color=f"C{i}", alpha=0.6,
                            label=SHARING_LABELS[sharing] if r is runs[0] else None)
        values = [r["eval_loss"][p] for r in finished(results) if r["mixer"] == mixer for p in plans]
        spread = max(values) - min(values)
        ax.set_ylim(min(values) - 0.3 * spread - 1e-3, max(values) + 0.3 * spread + 1e-3)  # the differences matter
        ax.set_xticks(range(len(plans)), plans)
        ax.set(ylabel="held-out loss (nats/token)", title=f"{MIXER_LABELS.get(mixer, mixer)}: held-out loss per plan "
               f"(bars: mean, dots: seeds)")
        ax.legend(fontsize=8)
        curves.set(xlabel="training tokens (M)", ylabel="training loss (nats, mixed modes)", title="Training loss")
        curves.legend(fontsize=8)
    tokens = {mixer: next(r["tokens"] for r in finished(results) if r["mixer"] == mixer) for mixer in mixers}
    fig.suptitle(f"Sharing ablation, {' / '.join(dict.fromkeys(f'{t / 1e6:.1f}M' for t in tokens.values()))} tokens per run "
                 f"({results.get('environment', {}).get('device', '?')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="sharing.json files (pooled)")
    parser.add_argument("--figure", help="PNG to write")
    args = parser.parse_args()
    results = pooled(args.results)
    print("\n".join(settings_lines(results)), end="\n\n")
    print(main_table(results), end="\n\n")
    print(difference_table(results), end="\n\n")
    print("\n".join(ordering_lines(results)))
    failed = [r["name"] for r in results["runs"] if "eval_loss" not in r]
    if failed:
        print(f"\nfailed runs: {', '.join(failed)}")
    if args.figure:
        figure(results, Path(args.figure))
        print(f"\nwrote {args.figure}")


if __name__ == "__main__":
    main()
