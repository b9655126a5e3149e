"""Tables (markdown) and figures (PNG) from the results.json that experiments/gpu_all.sh writes.

    python3 experiments/plots.py --results experiments/results/gpu/results.json --tables
    python3 experiments/plots.py --results experiments/results/gpu/results.json --figures docs/figures
    python3 experiments/plots.py --lm-results experiments/results/gpu-long/lm_budget_*.json --figure docs/figures/lm_long.png
    python3 experiments/plots.py --mqar-results experiments/results/gpu/results.json RERUN.json --tables --figure F.png
    python3 experiments/plots.py --mqar-results experiments/results/gpu-long/mqar-seeds/*_4000.json ... --tables

Runs of one MQAR model with different seeds are pooled: a table cell is the mean over the seeds with
their range, a figure draws the mean and shades the range.

--tables needs only the standard library; --figures needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

SHARE_TICKS = [0.0, 0.05, 0.1, 0.25, 1.0]
LM_PLANS = ["attention", "recurrent", "mixed", "every:2:64", "last:10%"]
MODEL_LABELS = {"transformer": "Transformer", "gdn-only": "GDN-only", "mamba2-only": "Mamba-2-only",
                "oryx-gdn": "Oryx-GDN", "oryx-mamba2": "Oryx-Mamba-2"}


def label(name: str) -> str:
    return MODEL_LABELS.get(name, name)


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def lm_table(lm: dict) -> str:
    oryx_total = max(m["parameters"]["total"] for m in lm["models"] if m["modes"] == "mixed")
    rows = []
    for m in lm["models"]:
        used = m["parameters"]["used"]
        ppl = [f"{math.exp(m['eval_loss'][p]):.2f}" if p in m["eval_loss"] else "-" for p in LM_PLANS]
        rows.append([label(m["name"]), m["modes"], f"{used / 1e6:.2f}M", f"{100 * (used / oryx_total - 1):+.1f}%",
                     f"{m['tokens'] / 1e6:.1f}M", f"{m['tokens_per_s'] / 1e3:.0f}k", *ppl])
    header = ["model", "training plan", "params used", "vs Oryx", "tokens", "train tok/s",
              *[f"ppl {p}" for p in LM_PLANS]]
    return markdown(header, rows)


def mqar_cells(mqar: dict):
    """{(length, pairs): {column: [accuracy per seed]}} with baseline columns and one column per Oryx
    (placement, share)."""
    cells, columns = {}, []
    for m in mqar["models"]:
        for r in m["eval"]:
            if r["placement"] == "own":
                column = label(m["name"])
            elif r["share"] in (0.0, 1.0):  # the pure plans: the same for both placements
                column = f"{label(m['name'])} {100 * r['share']:g}%"
            else:
                column = f"{label(m['name'])} {r['placement']} {100 * r['share']:g}%"
            if column not in columns:
                columns.append(column)
            cells.setdefault((r["length"], r["pairs"]), {}).setdefault(column, []).append(r["accuracy"])
    return cells, columns


def seed_summary(accuracies: list[float]) -> str:
    mean = sum(accuracies) / len(accuracies)
    if len(accuracies) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ({min(accuracies):.3f}–{max(accuracies):.3f})"


def seeds_line(mqar: dict) -> str:
    """'Seeds: Oryx-GDN 0, 1, 2; ...' (each model's seeds, in the order the models first appear)."""
    seeds = {}
    for m in mqar["models"]:
        seeds.setdefault(label(m["name"]), []).append(str(m.get("seed", 0)))
    return "Seeds: " + "; ".join(f"{name} {', '.join(s)}" for name, s in seeds.items())


def mqar_table(mqar: dict, placement: str) -> str:
    cells, columns = mqar_cells(mqar)
    keep = [c for c in columns if (" query " not in c and " last " not in c) or f" {placement} " in c]
    rows = [[f"T={t}, {p} pairs", *[seed_summary(cells[(t, p)][c]) if c in cells[(t, p)] else "-" for c in keep]]
            for t, p in sorted(cells)]
    return markdown(["setting", *keep], rows)


def switching_table(switching: dict) -> str:
    rows = []
    for m in switching["models"]:
        for r in m["plans"]:
            rows.append([label(m["name"]), f"`{r['plan']}`", r["switches"], f"{100 * r['attention_share']:.0f}%",
                         f"{r['perplexity']:.2f}", f"{math.exp(r['pure_plan_loss']):.2f}", f"{r['switch_cost']:+.4f}"])
    return markdown(["model", "plan", "switches", "attention tokens", "ppl", "ppl of the pure plans on the same tokens",
                     "switch cost (nats/token)"], rows)


def print_tables(results: dict) -> None:
    if results.get("lm_budget"):
        print("## LM at a fixed token budget (held-out perplexity)\n\n" + lm_table(results["lm_budget"]) + "\n")
    if results.get("mqar"):
        print(seeds_line(results["mqar"]) + " (a cell with several: mean (lowest–highest))\n")
        for placement in ("query", "last"):
            print(f"## MQAR accuracy, attention placement: {placement}\n\n" + mqar_table(results["mqar"], placement) + "\n")
    if results.get("switching"):
        print("## Switching cost\n\n" + switching_table(results["switching"]) + "\n")
    if results.get("default_model"):
        print(f"default model: {json.dumps(results['default_model'])}")


def lm_figure(lm: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in lm["models"]:
        steps, losses = zip(*m["loss_curve"])
        tokens = [s * lm["settings"]["seq_len"] * lm["settings"]["batch_size"] / 1e6 for s in steps]
        curves.plot(tokens, losses, label=f"{label(m['name'])} ({m['modes']})")
    curves.set(xlabel="training tokens (M)", ylabel="training loss (nats)", title="Training loss")
    curves.legend()
    names, width = [m["name"] for m in lm["models"]], 0.15
    for i, plan in enumerate(LM_PLANS):
        xs = [j + (i - 2) * width for j, m in enumerate(lm["models"]) if plan in m["eval_loss"]]
        ys = [math.exp(m["eval_loss"][plan]) for m in lm["models"] if plan in m["eval_loss"]]
        bars.bar(xs, ys, width, label=plan)
    every_ppl = [math.exp(v) for m in lm["models"] for v in m["eval_loss"].values()]
    bars.set_ylim(0.9 * min(every_ppl), 1.05 * max(every_ppl))  # the differences, not the bars' height, matter
    # each model's label under the middle of its own bars (a baseline has one plan, Oryx five)
    offsets = [[(i - 2) * width for i, plan in enumerate(LM_PLANS) if plan in m["eval_loss"]] for m in lm["models"]]
    ticks = [j + sum(o) / len(o) if o else j for j, o in enumerate(offsets)]
    bars.set_xticks(ticks, [label(n) for n in names], rotation=15)
    bars.set(ylabel="held-out perplexity", title="Held-out perplexity per plan")
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mqar_figure(mqar: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    settings = sorted({(r["length"], r["pairs"]) for m in mqar["models"] for r in m["eval"]})
    cols = min(4, len(settings))
    rows = math.ceil(len(settings) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    runs = {}                                          # a model's runs, one per seed
    for m in mqar["models"]:
        runs.setdefault(m["name"], []).append(m)
    for ax, (length, pairs) in zip(axes.flat, settings):
        for name, seeds in runs.items():
            m = seeds[0]
            cells = [[r for r in s["eval"] if (r["length"], r["pairs"]) == (length, pairs)] for s in seeds]
            if m["modes"] != "mixed":
                accuracies = [cell[0]["accuracy"] for cell in cells]
                color = "black" if m["modes"] == "attention" else "gray"
                ax.axhline(sum(accuracies) / len(accuracies), linestyle="-." if m["mixer"] == "mamba2" else "--",
                           color=color, linewidth=1, label=label(name))
                if len(seeds) > 1:
                    ax.axhspan(min(accuracies), max(accuracies), color=color, alpha=0.12, linewidth=0)
                continue
            for placement, style in (("query", "-o"), ("last", ":x")):
                keep = [[r for r in cell if r["placement"] == placement or r["share"] in (0.0, 1.0)] for cell in cells]
                if not keep[0]:
                    continue
                # the same plans in every seed's run; the share is the first seed's measured one
                rows = list(zip(*[sorted(k, key=lambda r: r["share"]) for k in keep]))
                shares = [rs[0]["attention_share"] for rs in rows]
                accuracies = [[r["accuracy"] for r in rs] for rs in rows]
                line, = ax.plot(shares, [sum(a) / len(a) for a in accuracies], style, markersize=3,
                                label=f"{label(name)} ({placement})")
                if len(seeds) > 1:
                    ax.fill_between(shares, [min(a) for a in accuracies], [max(a) for a in accuracies],
                                    color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("symlog", linthresh=0.1)  # linear up to 10%, where the claim lives
        ax.set_xticks(SHARE_TICKS, [f"{100 * s:g}%" for s in SHARE_TICKS])
        ax.set(title=f"T={length}, {pairs} pairs", xlabel="share of tokens in attention", ylim=(-0.02, 1.02))
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("MQAR accuracy")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def switching_figure(switching: dict, path: Path) -> None:
    """Per model: loss by position under each plan, and the switching cost by position."""
    import matplotlib.pyplot as plt

    models = switching["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.2 * len(models)), squeeze=False)
    bucket = switching["settings"]["curve_bucket"]
    for (loss_ax, cost_ax), m in zip(axes, models):
        for r in m["plans"]:
            xs = [bucket * (i + 0.5) for i in range(len(r["curve"]))]
            width = 2.0 if r["switches"] == 0 else 1.0
            loss_ax.plot(xs, r["curve"], linewidth=width, label=r["plan"])
            cost_ax.plot(xs, r["cost_curve"], linewidth=width, label=r["plan"])
        loss_ax.set(title=f"{label(m['name'])}: held-out loss by position", xlabel="position",
                    ylabel=f"mean loss (nats), buckets of {bucket}")
        cost_ax.axhline(0.0, color="black", linewidth=0.5)
        cost_ax.set(title=f"{label(m['name'])}: loss minus the pure plans' loss on the same tokens",
                    xlabel="position", ylabel="switching cost (nats)")
        cost_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures(results: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, draw, name in (("lm_budget", lm_figure, "lm_budget.png"), ("mqar", mqar_figure, "mqar_accuracy.png"),
                            ("switching", switching_figure, "switching.png")):
        if results.get(key):
            draw(results[key], folder / name)
            print(f"wrote {folder / name}")


def merge_runs(paths: list[str], section: str) -> dict:
    """One experiment's result from several result files of the same settings (one per GPU, call or rerun).

    A file is the runner's own JSON or a results.json holding it under `section`; a model named in a later
    file replaces the one of that name before it (a rerun). For MQAR, runs with another seed (the file's
    settings) are kept beside each other, each model tagged with its seed, and must share a step count."""
    parts = []
    for path in paths:
        try:
            part = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error})") from None
        part = part.get(section, part) if isinstance(part, dict) else part
        if not (isinstance(part, dict) and "settings" in part and "models" in part):
            raise ValueError(f"{path}: no {section} result in it (expected its 'settings' and 'models')")
        parts.append(part)
    for path, part in zip(paths[1:], parts[1:]):
        for key in ("seq_len", "batch_size"):
            if part["settings"][key] != parts[0]["settings"][key]:
                raise ValueError(f"{path}: {key} {part['settings'][key]} differs from "
                                 f"{paths[0]}'s {parts[0]['settings'][key]}")
    models, source = {}, {}
    for path, part in zip(paths, parts):
        seed = part["settings"].get("seed", 0)
        for m in part["models"]:
            key = (m["name"], seed) if section == "mqar" else m["name"]
            models[key], source[key] = {**m, "seed": seed}, path
    if section == "mqar":
        first = {}
        for (name, seed), m in models.items():
            other = first.setdefault(name, (m, source[name, seed]))
            if other[0].get("steps") != m.get("steps"):
                raise ValueError(f"{source[name, seed]}: {name} ran {m.get('steps')} steps, {other[1]}'s "
                                 f"{other[0].get('steps')}: runs of different lengths cannot be pooled")
    return {**parts[0], "models": list(models.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--results", help="results.json from experiments/gpu_all.sh")
    source.add_argument("--lm-results", nargs="+", metavar="JSON",
                        help="lm_budget.json files to draw as one experiment-1 figure (with --figure)")
    source.add_argument("--mqar-results", nargs="+", metavar="JSON",
                        help="mqar.json (or results.json) files merged into one experiment 2, later models "
                             "replacing earlier ones of the same name: --tables, and its figure with --figure")
    parser.add_argument("--tables", action="store_true", help="print the markdown tables")
    parser.add_argument("--figures", metavar="DIR", help="write the PNG figures to DIR")
    parser.add_argument("--figure", metavar="PNG", help="with --lm-results or --mqar-results: the figure's path")
    args = parser.parse_args()
    if args.lm_results or args.mqar_results:
        section, draw = ("lm_budget", lm_figure) if args.lm_results else ("mqar", mqar_figure)
        if args.lm_results and not args.figure:
            parser.error("--lm-results needs --figure PNG")
        try:
            merged = merge_runs(args.lm_results or args.mqar_results, section)
        except (ValueError, OSError) as error:
            parser.error(str(error))
        if args.tables:
            print_tables({section: merged})
        if args.figure:
            draw(merged, Path(args.figure))
            print(f"wrote {args.figure}")
        return
    results = json.loads(Path(args.results).read_text())
    if args.tables:
        print_tables(results)
    if args.figures:
        write_figures(results, Path(args.figures))


if __name__ == "__main__":
    main()
