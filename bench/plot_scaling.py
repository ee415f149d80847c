"""Tokens/s against tokens per row from ``bench/train_step.py`` JSONs, one line per model and attention
(and first-layer option: a sliding window or no dense layer; one-document rows; packed rows as separate
markers), log-scaled length axis. Runs where the results
are (matplotlib need not exist on the GPU machine):

    python3 -m bench.plot_scaling docs/results/train_step_*.json --out docs/scaling_tokens_per_s.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def first_layer(meta: dict, point: dict) -> str:
    """What a point's first layer is where it is not the model's dense layer: ``"window first layer"``
    (``model.sliding_layers``), ``"no dense layer"`` (``attention.n_dense_layers=0`` in an MSA series), or
    ``""``; from the layers the series built (``layers``), else from the run's overrides (older JSONs)."""
    layers = point.get("layers")
    if layers is not None:
        if layers.get("window"):
            return "window first layer"
        return "no dense layer" if point["attention"] == "msa" and not layers.get("dense") else ""
    overrides = list(meta.get("overrides", [])) + (list(meta.get("msa_overrides", []))
                                                   if point["attention"] == "msa" else [])
    if any(o.startswith("model.sliding_layers=") and o.split("=", 1)[1] not in ("[]", "null") for o in overrides):
        return "window first layer"
    if point["attention"] == "msa" and "attention.n_dense_layers=0" in overrides:
        return "no dense layer"
    return ""


def series(results: list[dict]) -> dict[tuple[str, str, str, str], list[tuple[int, float]]]:
    """``(model, attention, layout, first layer) -> [(tokens, tokens_per_s), ...]`` of the measured points,
    by length; the first-layer options (``first_layer``) are series of their own."""
    out: dict[tuple[str, str, str, str], list[tuple[int, float]]] = {}
    for res in results:
        for p in res["points"]:
            if p["status"] == "ok":
                key = (res["meta"]["model"], p["attention"], p["layout"], first_layer(res["meta"], p))
                out.setdefault(key, []).append((p["seq_len"], p["tokens_per_s"]))
    return {k: sorted(v) for k, v in out.items()}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for (model, kind, layout, first), pts in series(results).items():
        color = colors.setdefault((model, kind, first), f"C{len(colors)}")
        xs, ys = zip(*pts)
        name = f"{model} {kind}" + (f", {first}" if first else "")
        if layout == "one-doc":
            ax.plot(xs, ys, "o-" if kind == "msa" else "s--", color=color, label=name)
        else:
            ax.plot(xs, ys, "*", ms=11, color=color, label=f"{name}, packed row")
    ax.set_xscale("log", base=2)
    ticks = sorted({x for pts in series(results).values() for x, _ in pts})
    ax.set_xticks(ticks, [f"{t // 2**20}M" if t >= 2**20 else f"{t // 1024}K" if t >= 1024 else str(t)
                          for t in ticks])
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("tokens / s (one GPU)")
    gpu = results[0]["meta"]["gpu"] if results else ""
    ax.set_title(f"Training step throughput, {gpu}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/scaling_tokens_per_s.png"))
    args = ap.parse_args()
    plot([json.loads(p.read_text()) for p in args.json], args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
