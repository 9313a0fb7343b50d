"""Plots of the exact-ranking and two-stage benchmarks, from the JSON files their `--json` writes (or a GPU run's
`$OUT/*.json`): speed as a multiple of the baseline measured in the same run, so CPU and GPU runs plot alike.

- `exact_ranking`: for each KB size, the exact ranker scoring every pair, the pruned exact ranker (float32) and its
  fast mode (bf16, when measured), each as a multiple of the authors' evaluation loop (`x naive`); absolute
  mentions/s are printed on the bars for GPU runs only (CPU timings vary with the machine's load).
- `two_stage`: end-to-end speed as a multiple of exact ranking over the whole KB in the same run, against K (the
  candidates, in % of the KB), one panel per KB size and one line per stage-1 backend, a point labelled with how
  often the exact top-1 was among the K candidates where it was not always (and, for GPU runs, its mentions/s).
- `hnsw_sweep`: how often HNSW kept the exhaustive search's best estimate, against its search breadth, one line per
  graph (`hnsw_sweep.py`).

    python benchmarks/bench_exact_ranking.py --model tiny --sizes 6000,12000 --json exact.json
    python benchmarks/plot_results.py exact.json two_stage.json --out benchmarks/results/plots

Needs matplotlib (`pip install matplotlib`, part of the `train` extra).
"""

import argparse
import json
import os
import sys

# (label, key of the measured mentions/s) of the exact-ranking bars, in order
EXACT_BARS = (
    ("every pair, float32", "full_mentions_per_s"),
    ("pruned, float32", "exact_mentions_per_s"),
    ("pruned, fast mode", "fast_mentions_per_s"),
)


def on_gpu(payload: dict) -> bool:
    return payload.get("args", {}).get("device") == "cuda"


def exact_series(payload: dict) -> list[dict]:
    """Per KB size: the bars' labels, their speed as a multiple of the naive loop's, and their mentions/s."""
    series = []
    for result in payload["results"]:
        naive = result["naive_mentions_per_s"]
        bars = [(label, result[key]) for label, key in EXACT_BARS if result.get(key)]
        if label_dtype := result.get("fast_dtype"):
            bars = [(label.replace("fast mode", label_dtype), speed) for label, speed in bars]
        series.append({
            "entities": result["entities"],
            "labels": [label for label, _ in bars],
            "ratios": [speed / naive for _, speed in bars],
            "mentions_per_s": [speed for _, speed in bars],
        })
    return series


def two_stage_series(payload: dict) -> list[dict]:
    """Per (backend, KB size): K in % of the KB, speed as a multiple of exact ranking's, the candidate recall, and the
    mentions/s."""
    lines: dict[tuple, dict] = {}
    for result in payload["results"]:
        line = lines.setdefault((result["backend"], result["entities"]), {
            "backend": result["backend"], "entities": result["entities"], "k_percent": [], "ratios": [],
            "recall": []})
        line["k_percent"].append(result["k_percent"])
        line["ratios"].append(result["mentions_per_s"] / result["exact_mentions_per_s"])
        line["recall"].append(result["recall"])
        line.setdefault("mentions_per_s", []).append(result["mentions_per_s"])
    return list(lines.values())


def _title(payload: dict, path: str) -> str:
    return f"{os.path.basename(path)}: {payload.get('machine', '').split(';')[0]}"


def plot_exact(payload: dict, path: str, output: str) -> list[dict]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    series = exact_series(payload)
    figure = Figure(figsize=(max(6.4, 3.2 + 2.6 * len(series)), 4.2))
    axes = figure.subplots(1, len(series), squeeze=False)[0]
    for ax, group in zip(axes, series):
        bars = ax.bar(range(len(group["ratios"])), group["ratios"], color=["#9e9e9e", "#1f77b4", "#ff7f0e"])
        labels = [f"x{ratio:.0f}" for ratio in group["ratios"]]
        if on_gpu(payload):
            labels = [f"{label}\n{speed:,.0f}/s" for label, speed in zip(labels, group["mentions_per_s"])]
        ax.bar_label(bars, labels, fontsize=8)
        ax.set_xticks(range(len(group["labels"])), group["labels"], rotation=15, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(1, max(group["ratios"]) * 3)
        ax.axhline(1, color="black", linewidth=0.8)
        ax.set_title(f"{group['entities']:,} entities", fontsize=9)
    axes[0].set_ylabel("speed, multiple of the authors' loop")
    figure.suptitle(f"Exact ranking — {_title(payload, path)}", fontsize=9)
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    return series


def plot_two_stage(payload: dict, path: str, output: str) -> list[dict]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    series = two_stage_series(payload)
    sizes = sorted({line["entities"] for line in series})
    figure = Figure(figsize=(max(6.4, 1.4 + 4.4 * len(sizes)), 4.4))
    axes = figure.subplots(1, len(sizes), squeeze=False)[0]
    for ax, size in zip(axes, sizes):
        for line in (line for line in series if line["entities"] == size):
            ax.plot(line["k_percent"], line["ratios"], marker="o", label=line["backend"])
            points = zip(line["k_percent"], line["ratios"], line["recall"], line["mentions_per_s"])
            for x, y, recall, speed in points:
                text = [f"{100 * recall:.1f}%"] if recall < 1 else []
                text += [f"{speed:,.0f}/s"] if on_gpu(payload) else []
                if text:
                    ax.annotate(", ".join(text), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ks = sorted({k for line in series if line["entities"] == size for k in line["k_percent"]})
        ax.set_xticks(ks, [f"{k:g}" for k in ks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(1, color="black", linewidth=0.8)
        ax.set_xlabel("K, candidates re-scored (% of the KB)")
        ax.set_title(f"{size:,} entities", fontsize=9)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("speed, multiple of exact ranking")
    figure.suptitle(f"Two-stage retrieval — {_title(payload, path)}\n(labelled: how often the exact top-1 was among "
                    "the K, where below 100%)", fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    return series


def hnsw_series(payload: dict) -> list[dict]:
    """Per graph (M, efConstruction): efSearch, and how often the exhaustive search's best estimate was kept."""
    lines: dict[tuple, dict] = {}
    for result in payload["results"]:
        line = lines.setdefault((result["m"], result["ef_construction"]), {
            "m": result["m"], "ef_construction": result["ef_construction"], "build_s": result["build_s"],
            "ef_search": [], "kept": []})
        line["ef_search"].append(result["ef_search"])
        line["kept"].append(result["best_estimate_kept"])
    return list(lines.values())


def plot_hnsw(payload: dict, path: str, output: str) -> list[dict]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    series = hnsw_series(payload)
    figure = Figure(figsize=(6.4, 4.2))
    ax = figure.subplots()
    for line in series:
        ax.plot(line["ef_search"], [100 * kept for kept in line["kept"]], marker="o",
                label=f"M {line['m']}, efConstruction {line['ef_construction']} (built in {line['build_s']:.0f} s)")
    searches = sorted({ef for line in series for ef in line["ef_search"]})
    ax.set_xscale("log")
    ax.set_xticks(searches, [str(ef) for ef in searches])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("efSearch, the search breadth")
    ax.set_ylabel("exhaustive search's best estimate kept (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    k = payload["results"][0]["k"] if payload["results"] else "?"
    figure.suptitle(f"HNSW stage 1, {payload['entities']:,} entities, {payload['mentions']} mentions, K = {k} — "
                    f"{_title(payload, path)}", fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    return series


PLOTTERS = {"exact_ranking": plot_exact, "two_stage": plot_two_stage, "hnsw_sweep": plot_hnsw}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="JSON files written by the benchmarks' --json")
    parser.add_argument("--out", required=True, help="folder for the PNG files (one per JSON file)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_results.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    skipped = []
    for path in args.results:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        plotter = PLOTTERS.get(payload.get("benchmark"))
        if plotter is None:
            skipped.append(f"{path} ({payload.get('benchmark')!r})")
            continue
        output = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0] + ".png")
        plotter(payload, path, output)
        print(output)
    if skipped:
        print(f"not plotted (no plot for these benchmarks): {', '.join(skipped)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
