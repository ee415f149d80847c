"""What a person looks at: the results as ``results.json``, PNG plots and tables (the same tables go to
W&B as ``eval/tables/...``, the plots as ``eval/plots/...``).

- ``retrieval_<score>.png``: for each task, accuracy by length (columns) and depth (rows), a heatmap with
  the numbers written in; ``<score>`` is ``choice`` (log-likelihood) and, when generated, ``exact``;
- ``bpb_by_position.png``: bits per byte by position bucket, one line per eval length (dashed: the windows
  inside single documents);
- ``layer_recall.png``: per MSA layer, the index recall on held-out rows (per length; and on the windows
  inside single documents) and the needle recall of each task (mean over lengths).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from train.eval.runner import fmt_tokens, heldout_rows


def tables(results: dict) -> dict[str, tuple[list[str], list[list]]]:
    """``name -> (columns, rows)``: retrieval by task, length and depth; bits per byte by position; recall
    by layer."""
    retrieval = [[task, int(length), float(depth), d["choice"], d["share"], d["exact"], d["nll"], d["items"]]
                 for task, by_length in results["retrieval"].items() for length, r in by_length.items()
                 for depth, d in r["depths"].items()]
    rows = heldout_rows(results)
    bpb = [[int(length), bucket, v, kind] for length, kind, r in rows for bucket, v in r["buckets"].items()]
    layers = [["index_recall" if kind == "stream" else "index_recall_doc", int(length), int(layer), v]
              for length, kind, r in rows for layer, v in r.get("index_recall", {}).get("layers", {}).items()]
    layers += [[f"needle_recall/{task}", int(length), int(layer), v] for task, by_length in results["retrieval"].items()
               for length, r in by_length.items() for layer, v in r.get("needle_recall", {}).get("layers", {}).items()]
    columns = ["task", "length", "depth", "choice", "share", "exact", "nll", "items"]
    out = {"eval/tables/retrieval": (columns, retrieval),
           "eval/tables/bpb": (["length", "positions", "bpb", "windows"], bpb)}
    if layers:
        out["eval/tables/layers"] = (["measure", "length", "layer", "recall"], layers)
    return out


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_retrieval(results: dict, score: str, path: Path) -> bool:
    tasks = [t for t, by_length in results["retrieval"].items()
             if any(r[score] is not None for r in by_length.values())]
    if not tasks:
        return False
    lengths, depths = results["lengths"], results["depths"]
    fig = _figure(2.2 + 1.1 * len(lengths) * len(tasks), 1.2 + 0.45 * len(depths))
    axes = np.atleast_1d(fig.subplots(1, len(tasks), sharey=True))
    for ax, task in zip(axes, tasks):
        grid = np.array([[results["retrieval"][task][str(L)]["depths"][str(d)][score] for L in lengths]
                         for d in depths], dtype=float)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [fmt_tokens(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("length")
    axes[0].set_ylabel("depth of the needle")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label=f"accuracy ({score})")
    fig.suptitle(f"retrieval, step {results['step']}", fontsize=10)
    fig.savefig(path)
    return True


def plot_bpb(results: dict, path: Path) -> bool:
    if not results["bpb"]:
        return False
    fig = _figure(6, 3.5)
    ax = fig.subplots()
    colors = {}  # a length's document rows take its stream line's colour
    for length, kind, r in heldout_rows(results):
        names = list(r["buckets"])
        style = {"marker": "o"} if kind == "stream" else {"marker": "s", "linestyle": "--", "color": colors[length]}
        label = fmt_tokens(int(length)) + ("" if kind == "stream" else ", in one document")
        line, = ax.plot(range(len(names)), [r["buckets"][n] for n in names], label=label, **style)
        colors[length] = line.get_color()
        if kind == "stream":
            ax.set_xticks(range(len(names)), names)  # the longest length has every bucket: its ticks stay
    ax.set_xlabel("token positions")
    ax.set_ylabel("bits per byte")
    ax.legend(title="length (dashed: windows inside one document)", fontsize=7)
    ax.set_title(f"held-out bits per byte by position, step {results['step']}", fontsize=10)
    fig.savefig(path)
    return True


def plot_layers(results: dict, path: Path) -> bool:
    layers = results["msa_layers"]
    where = {"stream": "", "document": " in one document"}
    series = {f"index{where[kind]}, {fmt_tokens(int(L))}": r["index_recall"]["layers"]
              for L, kind, r in heldout_rows(results) if "index_recall" in r}
    for task, by_length in results["retrieval"].items():
        per = [r["needle_recall"]["layers"] for r in by_length.values() if "needle_recall" in r]
        if per:
            series[f"needle, {task}"] = {str(i): float(np.mean([p[str(i)] for p in per])) for i in layers}
    if not layers or not series:
        return False
    fig = _figure(2 + 0.25 * len(layers) * len(series), 3.5)
    ax = fig.subplots()
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ys = [np.nan if values.get(str(i)) is None else values[str(i)] for i in layers]
        ax.bar(np.arange(len(layers)) + k * width, ys, width, label=name)
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, [str(i) for i in layers])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("MSA layer")
    ax.set_ylabel("recall")
    ax.legend(fontsize=7, ncols=2)
    ax.set_title(f"index recall (teacher mass) and needle recall (needle blocks selected), step {results['step']}",
                 fontsize=9)
    fig.savefig(path)
    return True


def write_report(results: dict, out_dir: str | Path) -> tuple[dict[str, Path], dict]:
    """``results.json``, the tables as JSON and the PNG plots in ``out_dir``; returns ``{W&B name: png}``
    and the tables (``{W&B name: (columns, rows)}``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    named = tables(results)
    (out / "tables.json").write_text(json.dumps({k: {"columns": c, "rows": r} for k, (c, r) in named.items()}))
    images = {}
    for score in ("choice", "exact"):
        if plot_retrieval(results, score, out / f"retrieval_{score}.png"):
            images[f"eval/plots/retrieval_{score}"] = out / f"retrieval_{score}.png"
    if plot_bpb(results, out / "bpb_by_position.png"):
        images["eval/plots/bpb_by_position"] = out / "bpb_by_position.png"
    if plot_layers(results, out / "layer_recall.png"):
        images["eval/plots/layer_recall"] = out / "layer_recall.png"
    return images, named


__all__ = ["write_report", "tables", "plot_retrieval", "plot_bpb", "plot_layers"]
