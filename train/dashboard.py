"""Create the W&B workspace (dashboard) for training runs of this project.

    python -m train.dashboard --entity E --project P [--name "MSA training"] [--layers 24 --dense-layers 1] [--dry-run]

Sections: losses, MSA health (index recall, sparsity), throughput, memory, schedule (seq_len, stage,
lr, skipped data and bad steps), evals (bits per byte, retrieval accuracy, index and needle recall by
eval length; their plots and tables appear in W&B's media and table panels), and per-layer index KL /
recall. Per-layer metrics are drawn with a
metric regex, so one panel shows every layer whatever the model depth; `--layers N` adds one panel per
layer as well. `--dry-run` prints the layout and builds the workspace object without touching the
network; saving needs `WANDB_API_KEY` (or `wandb login`) and network access to W&B.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from train import metrics as M
from train.metrics import LAYER_KL_PREFIX, LAYER_RECALL_PREFIX, layer_kl_key, layer_recall_key


@dataclass(frozen=True)
class PanelSpec:
    title: str
    metrics: tuple[str, ...] = ()
    regex: str | None = None
    log_y: bool = False


@dataclass(frozen=True)
class SectionSpec:
    name: str
    panels: tuple[PanelSpec, ...]
    is_open: bool = True


def layout(layers: int | None = None, dense_layers: int = 1) -> list[SectionSpec]:
    """The dashboard as plain data: sections of panels, each naming the metrics it plots. Per-layer
    panels (``layers`` given) start at the first MSA layer: the ``dense_layers`` before it log no
    index metrics."""
    return [*_training_sections(), _eval_section(), *_layer_sections(layers, dense_layers)]


def _training_sections() -> list[SectionSpec]:
    """The metrics every logged training step (or every ``logging.stats_every``-th) writes."""
    return [
        SectionSpec("Loss", (
            PanelSpec("LM loss", (M.LOSS_LM,)),
            PanelSpec("LM loss by data source (data.sources)", regex=f"^{M.LOSS_LM_SOURCE_PREFIX}.+"),
            PanelSpec("Answer loss of the synthetic sources (nats per answer token)",
                      regex=f"^{M.LOSS_ANSWER_PREFIX}.+"),
            PanelSpec("Index KL (sum over MSA layers)", (M.LOSS_KL,), log_y=True),
        )),
        SectionSpec("MSA", (
            PanelSpec("Index recall (teacher mass in selected blocks, queries with > topk blocks) and its "
                      "ceilings (the best topk and 2 topk blocks)", (M.INDEX_RECALL, M.ORACLE_RECALL,
                                                                     M.ORACLE_RECALL_2X)),
            PanelSpec("Sparsity (fraction of visible keys skipped)", (M.SPARSITY,)),
            PanelSpec("Share of queries with more than topk visible blocks", (M.NONTRIVIAL,)),
            PanelSpec("Tile union (a kernel over each query tile's blocks: pairs computed per pair selected)",
                      (M.TILE_UNION,)),
        )),
        SectionSpec("Throughput", (
            PanelSpec("Tokens/s", (M.TOKENS_PER_S,)),
            PanelSpec("MFU", (M.MFU,)),
            PanelSpec("Attention / index TFLOP/s", (M.ATTN_TFLOPS, M.INDEX_TFLOPS)),
            PanelSpec("Step time (s)", (M.STEP_S,)),
        )),
        SectionSpec("Memory", (PanelSpec("Max allocated (GB)", (M.MAX_MEMORY,)),)),
        SectionSpec("Optimizer", (
            PanelSpec("Gradient norm (total, index branch)", (M.GRAD_NORM, M.GRAD_NORM_INDEX), log_y=True),
            PanelSpec("Learning rate per parameter group", regex=f"^{M.LR_GROUP_PREFIX}.*"),
        )),
        SectionSpec("Schedule", (
            PanelSpec("Sequence length", (M.SEQ_LEN,)),
            PanelSpec("Recipe stage / sparse phase", (M.STAGE, M.PHASE_SPARSE)),
            PanelSpec("Learning rate", (M.LR,)),
            PanelSpec("Skipped samples / bad steps", (M.SKIPPED, M.BAD_STEPS)),
        )),
    ]


def _eval_section() -> SectionSpec:
    """The ``eval/...`` metrics of periodic and standalone evals."""
    e = M.EVAL_PREFIX  # eval/<task>/<length>[/<score>]: lines per length and task, by regex (docs/evals.md)
    return SectionSpec("Evals", (
        PanelSpec("Held-out bits per byte, by eval length (bpb_doc: windows inside one document)",
                  regex=f"^{e}bpb(_doc)?/[^/]+$"),
        PanelSpec("Held-out bits per byte by token position", regex=f"^{e}bpb/[^/]+/.+"),
        PanelSpec("Held-out bits per byte by token position, windows inside one document",
                  regex=f"^{e}bpb_doc/[^/]+/.+"),
        PanelSpec("Retrieval accuracy, log-likelihood choice (chance 1/eval.choices)", regex=f"^{e}.+/choice$"),
        PanelSpec("Retrieval accuracy and answer share, needles below depth 1 only (not next to the question)",
                  regex=f"^{e}.+/(choice|share)_far$"),
        PanelSpec("Retrieval exact match, greedy generation", regex=f"^{e}.+/exact$"),
        PanelSpec("Answer's share of the candidates' probability (chance 1/eval.choices)", regex=f"^{e}.+/share$"),
        PanelSpec("Answer NLL per token (nats)", regex=f"^{e}.+/nll$"),
        PanelSpec("Index recall on held-out rows, and its ceilings (the best topk and 2 topk blocks), by eval "
                  "length (_doc: windows inside one document)", regex=f"^{e}(index|oracle)_recall(_2x)?(_doc)?/.*"),
        PanelSpec("Needle recall of the indexer (needle blocks the question selects)", regex=f"^{e}needle_recall/.*"),
        PanelSpec("Tile union by eval length (a query-tile kernel's pairs per pair selected)",
                  regex=f"^{e}tile_union/.*"),
    ))


def _layer_sections(layers: int | None, dense_layers: int) -> list[SectionSpec]:
    """Per-layer index KL and recall: one panel of all layers, and one per MSA layer where ``layers`` is given."""
    sections = []
    for title, prefix, key in (("Per-layer index KL", LAYER_KL_PREFIX, layer_kl_key),
                               ("Per-layer index recall", LAYER_RECALL_PREFIX, layer_recall_key)):
        panels = [PanelSpec(f"{title}: all layers", regex=f"^{prefix}.*", log_y=prefix == LAYER_KL_PREFIX)]
        panels += [PanelSpec(f"{title}: layer {i}", (key(i),)) for i in range(dense_layers, layers or 0)]
        sections.append(SectionSpec(title, tuple(panels), is_open=False))
    return sections


def build_workspace(entity: str, project: str, name: str = "MSA training", layers: int | None = None,
                    dense_layers: int = 1):
    """A `wandb_workspaces.workspaces.Workspace` for `layout(...)`; nothing is sent until `.save()`."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def panel(p: PanelSpec):
        if p.regex is not None:
            return wr.LinePlot(title=p.title, x="Step", metric_regex=p.regex, log_y=p.log_y or None)
        return wr.LinePlot(title=p.title, x="Step", y=list(p.metrics), log_y=p.log_y or None)

    sections = [ws.Section(name=s.name, panels=[panel(p) for p in s.panels], is_open=s.is_open)
                for s in layout(layers, dense_layers)]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        settings=ws.WorkspaceSettings(x_axis="Step", max_runs=20))


def format_layout(sections: list[SectionSpec]) -> str:
    lines = []
    for s in sections:
        lines.append(f"[{s.name}]{'' if s.is_open else ' (collapsed)'}")
        for p in s.panels:
            what = f"regex {p.regex}" if p.regex else ", ".join(p.metrics)
            lines.append(f"  {p.title}: {what}{' (log y)' if p.log_y else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", required=True, help="W&B project the runs log to")
    parser.add_argument("--name", default="MSA training", help="workspace (view) name")
    parser.add_argument("--layers", type=int, default=None, help="also one panel per MSA layer of an N-layer model")
    parser.add_argument("--dense-layers", type=int, default=1,
                        help="attention.n_dense_layers of the model: per-layer panels start after them")
    parser.add_argument("--dry-run", action="store_true", help="print the layout; send nothing")
    args = parser.parse_args(argv)
    if (args.layers is not None and args.layers < 0) or args.dense_layers < 0:
        parser.error("--layers and --dense-layers must be >= 0")

    workspace = build_workspace(args.entity, args.project, args.name, args.layers, args.dense_layers)
    model = workspace._to_model()  # validates the whole spec offline, before any network call
    n_panels = sum(len(s.panels) for s in model.spec.section.panel_bank_config.sections)
    print(f"workspace {args.name!r} for {args.entity}/{args.project}: "
          f"{len(workspace.sections)} sections, {n_panels} panels")
    print(format_layout(layout(args.layers, args.dense_layers)))
    if args.dry_run:
        return 0
    workspace.save()
    print(f"saved: {workspace.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
