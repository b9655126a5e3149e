"""Tables (markdown) and figures (PNG) for the retrieval-without-an-oracle and single-pass-budget runs.

    python3 experiments/plot_science.py --retrieval experiments/results/science/mqar_no_oracle.json \\
        --tables --figure docs/figures/mqar_no_oracle.png
    python3 experiments/plot_science.py --single-pass experiments/results/science/lm_single_pass.json \\
        --tables --figure docs/figures/lm_single_pass.png

Several files of one kind are merged (their runs pooled; all must have the same step count).
A table cell is the mean over seeds with the lowest and highest in brackets. --tables needs only
the standard library; --figure needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

LABELS = {"transformer": "Transformer", "gdn-only": "GDN-only", "mamba2-only": "Mamba-2-only",
          "oryx-gdn": "Oryx-GDN", "oryx-mamba2": "Oryx-Mamba-2"}
FAMILIES = {"oryx-gdn": ("transformer", "gdn-only"), "oryx-mamba2": ("transformer", "mamba2-only")}


def label(name: str) -> str:
    return LABELS.get(name, name)


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def spread(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def fail(message: str):
    print(f"plot_science.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load(paths: list[str], experiment: str) -> dict:
    """The files' runs pooled into one results dict (the first file's settings)."""
    merged = None
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            fail(f"{path}: cannot read results ({e})")
        if data.get("experiment") != experiment:
            fail(f"{path}: not a {experiment} results file")
        if merged is None:
            merged = {**data, "models": [], "sources": []}
        elif data["steps"] != merged["steps"]:
            fail(f"{path}: {data['steps']} steps, the others {merged['steps']}")
        merged["models"] += [m for m in data["models"] if "error" not in m]
        merged["sources"].append({"file": path, "command": data.get("command"), "environment": data["environment"]})
    return merged


# ----- retrieval -----
def retrieval_cells(results: dict) -> dict:
    """{(model, lr): {(length, pairs): {plan: [(share, accuracy) per seed]}}}"""
    cells = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for model in results["models"]:
        for row in model["eval"]:
            cells[(model["name"], model["lr"])][(row["length"], row["pairs"])][row["plan"]].append(
                (row["share"], row["accuracy"]))
    return cells


def retrieval_tables(results: dict) -> str:
    cells = retrieval_cells(results)
    lr = results["settings"]["lr"]
    settings = sorted({key for per_model in cells.values() for key in per_model})
    header = ["plan (attention share)"] + [f"T={t}, {p} pairs ({p / t:.1%} queries)" for t, p in settings]
    out = []
    for oryx, baselines in FAMILIES.items():
        if (oryx, lr) not in cells:
            continue
        rows = []
        for name in baselines:
            if (name, lr) in cells:
                rows.append([f"**{label(name)}**"] + [spread([a for _, a in cells[(name, lr)][s].get(
                    "attention" if name == "transformer" else "recurrent", [])]) for s in settings])
        for plan in results["settings"]["eval_plans"]:
            shares = [sh for s in settings for sh, _ in cells[(oryx, lr)][s].get(plan, [])]
            share = f"{statistics.mean(shares):.1%}" if shares else "-"
            rows.append([f"{label(oryx)} `{plan}` ({share})"]
                        + [spread([a for _, a in cells[(oryx, lr)][s].get(plan, [])]) for s in settings])
        out.append(markdown(header, rows))
    sweep = results["settings"].get("lr_sweep") or {}
    swept = sorted((key for key in cells if key[0] == sweep.get("model")), key=lambda key: key[1])
    if len(swept) > 1:
        plan = "attention" if sweep["model"] == "transformer" else "recurrent"
        rows = [[f"{label(name)} lr {rate:g}"] + [spread([a for _, a in cells[(name, rate)][s].get(plan, [])])
                                                for s in settings] for name, rate in swept]
        out.append(markdown(["learning-rate sweep"] + header[1:], rows))
    seeds = sorted({m["seed"] for m in results["models"]})
    out.append(f"(seeds {', '.join(map(str, seeds))}; {results['steps']} steps; mean over seeds, lowest–highest in brackets)")
    return "\n\n".join(out)


def plan_family(plan: str) -> str:
    return plan.split(":")[0] if ":" in plan else "pure"


def retrieval_figure(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = retrieval_cells(results)
    lr = results["settings"]["lr"]
    settings = sorted({key for per_model in cells.values() for key in per_model})
    oryx_models = [m for m in FAMILIES if (m, lr) in cells]
    fig, axes = plt.subplots(len(oryx_models), len(settings), figsize=(2.6 * len(settings), 2.8 * len(oryx_models)),
                             squeeze=False, sharex=True, sharey=True)
    markers = {"pure": "s", "last": "o", "every": "^", "chunks": "x"}
    for row, oryx in enumerate(oryx_models):
        for col, setting in enumerate(settings):
            ax = axes[row][col]
            for family, marker in markers.items():
                points = []
                for plan, values in cells[(oryx, lr)][setting].items():
                    if plan_family(plan) == family:
                        points.append((statistics.mean(s for s, _ in values), statistics.mean(a for _, a in values),
                                       min(a for _, a in values), max(a for _, a in values)))
                if points:
                    points.sort()
                    x, y, lo, hi = zip(*points)
                    ax.errorbar(x, y, yerr=[[m - l for m, l in zip(y, lo)], [h - m for m, h in zip(y, hi)]],
                                fmt=marker, ms=4, capsize=2, label=f"{label(oryx)} {family}")
            for name, style in zip(FAMILIES[oryx], ("--", ":")):
                plan = "attention" if name == "transformer" else "recurrent"
                values = [a for _, a in cells.get((name, lr), {}).get(setting, {}).get(plan, [])]
                if values:
                    ax.axhline(statistics.mean(values), ls=style, color="grey", label=label(name))
            t, p = setting
            ax.axvline(p / t, color="red", lw=0.6, alpha=0.5)
            ax.set_title(f"{label(oryx)}, T={t}, {p} pairs", fontsize=8)
            ax.set_ylim(-0.02, 1.02)
            if row == len(oryx_models) - 1:
                ax.set_xlabel("attention share")
            if col == 0:
                ax.set_ylabel("accuracy")
        axes[row][0].legend(fontsize=6, loc="lower right")
    seeds = len({m["seed"] for m in results["models"]})
    fig.suptitle(f"MQAR without an oracle: accuracy against the share of attention tokens "
                 f"({results['steps']} steps, mean of {seeds} seeds, bars: range; red: queries' share)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----- single-pass budgets -----
def seeds_note(results: dict) -> str:
    """'3 seeds', or '1–3 seeds' where some model has fewer runs than another (a failed run is left out)."""
    per_model = defaultdict(set)
    for model in results["models"]:
        per_model[model["name"]].add(model["seed"])
    counts = sorted({len(seeds) for seeds in per_model.values()}) or [0]
    return f"{counts[0]} seeds" if len(counts) == 1 else f"{counts[0]}–{counts[-1]} seeds"


def curves(results: dict) -> dict:
    """{(model, plan): {tokens: [loss per seed]}}"""
    out = defaultdict(lambda: defaultdict(list))
    for model in results["models"]:
        for point in model["eval_curve"]:
            for plan, loss in point["loss"].items():
                out[(model["name"], plan)][point["tokens"]].append(loss)
    return out


def single_pass_tables(results: dict) -> str:
    by_model = defaultdict(list)
    for model in results["models"]:
        by_model[model["name"]].append(model)
    plans = results["settings"]["oryx_eval_plans"]
    header = ["model", "params used", "tokens (passes)", "train tok/s"] + [f"loss {p}" for p in plans] + ["ppl attention", "ppl recurrent"]
    rows = []
    for name in LABELS:
        runs = by_model.get(name)
        if not runs:
            continue
        losses = {p: [r["eval_loss"][p] for r in runs if p in r["eval_loss"]] for p in plans}
        ppl = {p: f"{math.exp(statistics.mean(v)):.2f}" if v else "-" for p, v in losses.items()}
        every_seed = sorted({m["seed"] for m in results["models"]})
        seeds = sorted(r["seed"] for r in runs)
        named = label(name) if seeds == every_seed else \
            f"{label(name)} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
        rows.append([named, f"{runs[0]['parameters']['used'] / 1e6:.2f}M",
                     f"{runs[0]['tokens'] / 1e6:.1f}M ({runs[0]['tokens'] / results['train_split_tokens']:.2f})",
                     f"{statistics.median(r['tokens_per_s'] for r in runs) / 1e3:.0f}k"]
                    + [spread(losses[p], 4) for p in plans] + [ppl.get("attention", "-"), ppl.get("recurrent", "-")])
    table = markdown(header, rows)
    # the curve: every evaluation point, mean over seeds, one column per (model, readout)
    series = curves(results)
    keys = [k for k in sorted(series, key=lambda k: (list(LABELS).index(k[0]) if k[0] in LABELS else 99, k[1]))
            if k[1] in ("attention", "recurrent")]
    points = sorted({t for k in keys for t in series[k]})
    curve = markdown(["tokens"] + [f"{label(n)} {p}" for n, p in keys],
                     [[f"{t / 1e6:.2f}M"] + [f"{statistics.mean(series[k][t]):.4f}" if series[k].get(t) else "-"
                                             for k in keys] for t in points])
    seeds = sorted({m["seed"] for m in results["models"]})
    note = (f"(held-out loss in nats/token on one fixed validation set of {results['validation']['windows']} windows "
            f"of {results['validation']['window_tokens']} tokens for every model and seed; seeds "
            f"{', '.join(map(str, seeds))}, {seeds_note(results)} a model; mean (lowest–highest))")
    checked = [m["eval_loss_max_abs_difference"] for m in results["models"] if "eval_loss_max_abs_difference" in m]
    if checked:
        note += (f"\n\n(final evaluation inside the training loop against the final checkpoint loaded afresh: largest "
                 f"difference {max(checked):.2e} nats over {len(checked)} runs)")
    else:
        note += ("\n\n(no run of these files scored its final checkpoint afresh: written before that check, so the curve "
                 "points after a run's first evaluation may come from weights cached at that first evaluation)")
    return "\n\n".join([table, curve, note])


def single_pass_figure(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = curves(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (oryx, baselines) in zip(axes, FAMILIES.items()):
        lines = [(oryx, "attention", "-"), (oryx, "recurrent", "-")] + [(b, None, "--") for b in baselines]
        for name, plan, style in lines:
            plan = plan or ("attention" if name == "transformer" else "recurrent")
            points = series.get((name, plan))
            if not points:
                continue
            tokens = sorted(points)
            mean = [statistics.mean(points[t]) for t in tokens]
            x = [t / 1e6 for t in tokens]
            ax.plot(x, mean, style, marker=".", label=f"{label(name)} ({plan})" if name == oryx else label(name))
            ax.fill_between(x, [min(points[t]) for t in tokens], [max(points[t]) for t in tokens], alpha=0.2)
        ax.set_title(f"{label(oryx)} and its baselines")
        ax.set_xlabel("training tokens (M)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out loss (nats/token)")
    fig.suptitle(f"Single pass: held-out loss against tokens (at most {results['passes']:.2f} passes; "
                 f"mean of {seeds_note(results)}, band: range)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--retrieval", nargs="+", metavar="JSON", help="mqar_no_oracle.json files")
    which.add_argument("--single-pass", nargs="+", metavar="JSON", help="lm_single_pass.json files")
    parser.add_argument("--tables", action="store_true", help="print markdown tables")
    parser.add_argument("--figure", type=Path, help="write the figure (PNG)")
    args = parser.parse_args()
    if args.retrieval:
        results = load(args.retrieval, "mqar_no_oracle")
        tables, figure = retrieval_tables, retrieval_figure
    else:
        results = load(args.single_pass, "lm_single_pass")
        tables, figure = single_pass_tables, single_pass_figure
    if not results["models"]:
        fail("no finished runs in the given files")
    if args.tables:
        print(tables(results))
    if args.figure:
        figure(results, args.figure)
        print(f"wrote {args.figure}", file=sys.stderr)


if __name__ == "__main__":
    main()
