"""Markdown tables for the docs from benchmark JSONs, and the marked blocks of the docs they fill.

    python3 -m bench.render_docs            # print every block from the JSONs in docs/results/
    python3 -m bench.render_docs --write    # and replace the marked blocks in docs/*.md and README.md
    python3 -m bench.render_docs --collect <folder> --write   # first copy a GPU call's JSONs in

A block in a markdown file sits between ``<!-- begin: NAME -->`` and ``<!-- end: NAME -->``; ``BLOCKS``
says which JSON (a glob under docs/results/) renders it with which function. A block whose JSON is
missing is left as it is (with ``--write``) and reported.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def _k(n: int) -> str:
    return f"{n // 2**20}M" if n >= 2**20 and n % 2**20 == 0 else f"{n // 1024}K" if n >= 1024 else str(n)


def _num(x, fmt="{:,.0f}") -> str:
    return "" if x is None else fmt.format(x)


def header(meta: dict) -> str:
    overrides = " ".join(meta.get("overrides") or [])
    shown = overrides and overrides not in str(meta.get("command"))  # the command line may hold them already
    return (f"{meta.get('gpu')}, torch {meta.get('torch')}, Triton {meta.get('triton')}, DeepSpeed "
            f"{meta.get('deepspeed')}; commit `{meta.get('commit')}`; {meta.get('date_utc')}; command "
            f"`{meta.get('command')}`" + (f" -- {overrides}" if shown else ""))


COMMON_OVERRIDES = ("parallel.activation_checkpointing=true",)  # every run of bench/train_step_gpu.sh


def label(meta: dict) -> str:
    """The model, with the overrides that set a run apart from the others (e.g. a 1M run's checkpointing)."""
    extra = [o.removeprefix("parallel.") for o in meta.get("overrides") or [] if o not in COMMON_OVERRIDES]
    if meta.get("msa_overrides"):  # bench.train_step --msa-overrides: the MSA series' own
        extra.append(f"MSA with {', '.join(meta['msa_overrides'])}")
    if meta.get("rows", 1) > 1:  # bench.train_step --rows: rows per micro-batch, each one document of the row's length
        extra.append(f"{meta['rows']} rows a step")
    return meta["model"] + (f" ({', '.join(extra)})" if extra else "")


def labels(metas: list[dict]) -> list[str]:
    """``label`` of each run, with its card where the runs used more than one kind (``on H100`` after the
    label of each run not on the most common card), its short commit where two runs would read the same, and
    the name of the JSON its command wrote where that is not enough (two runs of one commit)."""
    cards = [gpu_slug(m.get("gpu", "")) for m in metas]
    usual = max(set(cards), key=cards.count) if cards else None
    plain = [label(m) + (f" on {c.upper()}" if c != usual else "") for m, c in zip(metas, cards)]
    named = [f"{n} @{str(m.get('commit'))[:7]}" if plain.count(n) > 1 else n for n, m in zip(plain, metas)]
    wrote = [re.search(r"--json\s+(\S+)", m.get("command") or "") for m in metas]
    return [f"{n} [{Path(w[1]).stem}]" if named.count(n) > 1 and w else n for n, w in zip(named, wrote)]


def render_train_step(results: list[dict]) -> str:
    """Throughput, dense-vs-MSA, profile and memory tables of ``bench/train_step.py`` results."""
    names = labels([r["meta"] for r in results])
    out = []
    for res, name in zip(results, names):
        out += [f"**{name}**: " + header(res["meta"]), ""]
    out += ["| model | attention | row | tokens | step s (timed steps) | tokens/s | MFU | model TFLOP/s | peak GB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for res, name in zip(results, names):
        for p in res["points"]:
            if p["status"] != "ok":
                continue
            mem = p.get("memory", {})
            steps = "the warm-up step" if p.get("warmup_only") else ", ".join(f"{t:.3f}" for t in p["step_s_all"])
            out.append(f"| {name} | {p['attention']} | {p['layout']}"
                       f"{' (' + str(p['docs']) + ' docs)' if p['layout'] == 'packed' else ''} | {_k(p['seq_len'])} | "
                       f"{p['step_s']:.3f} ({steps}) | "
                       f"{p['tokens_per_s']:,} | {_num(p.get('mfu'), '{:.1%}')} | {p['model_tflops']:.0f} | "
                       f"{_num(mem.get('peak_gb'), '{:.1f}')} |")
    out += ["", "| model | row | tokens | dense tokens/s | MSA tokens/s | MSA / dense |", "|---|---|---|---|---|---|"]
    for res, name in zip(results, names):
        got = {(p["attention"], p["layout"], p["seq_len"]): p for p in res["points"]}
        for layout, n in dict.fromkeys((p["layout"], p["seq_len"]) for p in res["points"]):
            d, m = got.get(("dense", layout, n)), got.get(("msa", layout, n))
            dv = d["tokens_per_s"] if d and d["status"] == "ok" else None
            mv = m["tokens_per_s"] if m and m["status"] == "ok" else None
            extra = next((e for e in res.get("dense_extrapolated", []) if e["seq_len"] == n and layout == "one-doc"
                          and dv is None), None)
            if extra:  # labelled: a fit over dense's measured rows, not a measured step
                dv = extra["tokens_per_s"]
                dense_cell = f"{dv:,} (extrapolated from {', '.join(_k(x) for x in extra['from'])})"
            else:
                dense_cell = _num(dv) or _why(d)
            ratio = f"{mv / dv:.2f}x" + (" (dense extrapolated)" if extra else "") if dv and mv else ""
            out.append(f"| {name} | {layout} | {_k(n)} | {dense_cell} | {_num(mv) or _why(m)} | {ratio} |")
    out += ["", "Profiled step, GPU time by kernel bucket (ms; `idle`: step wall time with no kernel running):", "",
            "| model | attention | row | tokens | step ms | msa | attention | gemm | elementwise | communication "
            "| other | idle | largest kernel |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res, name in zip(results, names):
        for p in res["points"]:
            prof = p.get("profile")
            if not prof:
                continue
            ms = prof["ms"]
            top = max((k for ks in prof["top"].values() for k in ks), key=lambda k: k["ms"], default=None)
            largest = f"{top['name'][:50]} ({top['ms']:.0f})" if top else ""
            buckets = " | ".join(f"{ms[b]:.0f}" for b in ("msa", "attention", "gemm", "elementwise", "communication",
                                                         "other"))
            out.append(f"| {name} | {p['attention']} | {p['layout']} | {_k(p['seq_len'])} | "
                       f"{prof['wall_ms']:.0f} | {buckets} | {prof['idle_ms']:.0f} | {largest} |")
    out += ["", "Memory (GB): weights and optimizer state counted from the tensors that hold them; `other` = "
            "allocated after a step minus those two (gradient buffers; in dense rows measured before `c532d27` "
            "also the MSA series' engine, which was not freed: those rows' peaks are that much too high); "
            "`transient` = the timed steps' peak minus "
            "that; `MSA layer alone` = one layer's selection, sparse attention and index KL forward+backward "
            "measured by itself; `block inputs` = layers x tokens x dim x 2 bytes (computed, not measured):", "",
            "| model | attention | row | tokens | weights | optimizer | other | transient | peak | reserved peak "
            "| MSA layer alone | block inputs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res, name in zip(results, names):
        for p in res["points"]:
            mem = p.get("memory")
            if not mem or "peak_gb" not in mem:
                continue
            out.append(f"| {name} | {p['attention']} | {p['layout']} | {_k(p['seq_len'])} | "
                       + " | ".join(_num(mem.get(k), "{:.2f}") if not isinstance(mem.get(k), str) else mem[k][:40]
                                    for k in ("weights_gb", "optimizer_gb", "other_persistent_gb",
                                              "step_transient_gb", "peak_gb", "reserved_peak_gb", "msa_layer_gb",
                                              "checkpointed_inputs_gb_computed")) + " |")
    stops = [(name, p) for res, name in zip(results, names) for p in res["points"] if p["status"] != "ok"]
    if stops:
        out += ["", "Not measured, and why:", ""]
        out += [f"- {m} {p['attention']} {p['layout']} {_k(p['seq_len'])}: {p['status']}" for m, p in stops]
    return "\n".join(out)


def _why(p) -> str:
    if p is None:
        return "not in the run"
    s = p["status"]
    return "OOM" if s.startswith("OOM") else "skipped (time)" if s.startswith("skipped") else s[:30]


def render_compare(res: dict) -> str:
    """``bench/compare_kernels.py``: times of both trees per case and the bitwise-equality checks."""
    m = res["meta"]
    out = [f"{m.get('gpu')}, torch {m.get('torch')}, Triton {m.get('triton')}; commit `{m.get('commit')}`; "
           f"{m.get('date_utc')}; command `{m.get('command')}`", "",
           "| N | H x Hkv | case | baseline ms | this tree ms | baseline / this |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        for case, t in r["times"]["this"].items():
            b = r["times"]["base"].get(case)
            out.append(f"| {_k(r['N'])} | {r['H']}x{r['Hkv']} | {case} | {_num(b, '{:.2f}')} | {t:.2f} | "
                       f"{_num(b / t if b else None, '{:.3f}')} |")
    out += ["", "| N | H x Hkv | bitwise equal to the baseline | differ |", "|---|---|---|---|"]
    for r in res["rows"]:
        c, items = r["checks"], {}
        items.update(c["selection_bitwise_equal"])
        items.update(c.get("main_fwd_bitwise_equal", {}))
        for case in [k for k in c if k == "default" or k.startswith("dq=")]:
            for n, eq in c[case]["bitwise_equal"].items():
                rerun = c[case]["base_rerun_bitwise_equal"][n]
                items[f"{n}[{case}]"] = eq if eq or rerun else "no (the baseline's own rerun differs too)"
        bad = {n: v for n, v in items.items() if v is not True}
        out.append(f"| {_k(r['N'])} | {r['H']}x{r['Hkv']} | {len(items) - len(bad)} of {len(items)} | "
                   f"{', '.join(f'{n}: {v}' for n, v in bad.items())} |")
    if m.get("not_run"):
        out += ["", "Not run (time budget): " + ", ".join(f"{_k(x['N'])} {x['shape']}" for x in m["not_run"])]
    return "\n".join(out)


def _ms(r) -> str:
    if r is None:
        return ""
    if "ms" not in r:
        return re.sub(r"skipped \(estimated (\d+ s) per call.*", r"not run (est. \1)", r["status"])
    ms = r["ms"]
    return (f"{ms:,.1f}" if ms < 1000 else f"{ms:,.0f}") + (" *" if r.get("timing") == "1 call" else "")


def render_headline(res: dict, Hkv: int = 2) -> str:
    """README's headline table: dense SDPA against the whole MSA attention (index, sparse attention and,
    forward+backward, the index KL), ms per call, Hkv = 2, from 32K on; ``*`` marks a one-call cell, and no
    speedup is shown from one."""
    at = {(r["case"], r["mode"], r["N"]): r for r in res["results"] if r["Hkv"] == Hkv}
    out = ["| N | dense SDPA fwd+bwd | MSA fwd+bwd (index + sparse attention + index KL) | speedup | dense SDPA fwd "
           "| MSA fwd (index + sparse attention) | speedup |", "|---|---|---|---|---|---|---|"]
    for n in sorted({n for _, _, n in at if n >= 32768}):
        cells = []
        for mode in ("fwd+bwd", "fwd"):
            d, m = at.get(("dense_sdpa", mode, n)), at.get(("msa_whole", mode, n))
            ratio = ""
            if d and m and "ms" in d and "ms" in m:
                # no ratio from a one-call cell (issue 12, item 17): it waits for a rerun
                cold = "1 call" in (d.get("timing"), m.get("timing"))
                ratio = "not shown *" if cold else f"{d['ms'] / m['ms']:.1f}x"
            cells += [_ms(d), _ms(m), ratio]
        out.append(f"| {_k(n)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def render_old_new(res: dict) -> str:
    from bench.step_time_old_new import render

    return render(res)


def render_patterns(path: str) -> str:
    from bench.msa_attention import render_markdown

    return render_markdown(path)


def headline_source(paths: list[str]) -> str:
    """The headline rerun's JSON (``msa_attention_headline_<gpu>.json``) where there is one, else the full
    benchmark run's (``msa_attention_<gpu>.json``); never a variant's (``msa_attention_klbwd_h200.json``)."""
    names = {p: Path(p).name for p in paths}
    rerun = [p for p in paths if re.fullmatch(r"msa_attention_headline_[a-z0-9]+\.json", names[p])]
    full = [p for p in paths if re.fullmatch(r"msa_attention_[a-z0-9]+\.json", names[p])]
    return (rerun or full)[-1]


def _headline(paths: list[str]) -> str:
    return render_headline(json.loads(Path(headline_source(paths)).read_text()))


def _old_new_files(paths) -> str:
    """``render_old_new`` of each ``bench/step_time_old_new.py`` JSON in ``paths``."""
    return "\n\n".join(render_old_new(json.loads(Path(p).read_text())) for p in paths)


# block name -> (glob under docs/results, renderer taking the list of matching paths)
BLOCKS = {
    "headline": ("msa_attention_*h200.json", _headline),
    "msa_attention": ("msa_attention_h200.json", lambda ps: render_patterns(ps[0])),
    "train_step": ("train_step_*.json", lambda ps: render_train_step([json.loads(Path(p).read_text()) for p in ps])),
    "renovation_compare": ("compare_kernels_renovation_*.json",
                           lambda ps: "\n\n".join(render_compare(json.loads(Path(p).read_text())) for p in ps)),
    "renovation_step": ("step_time_old_new_*.json", _old_new_files),
    "selection_patterns": ("msa_patterns_*.json", lambda ps: "\n\n".join(render_patterns(p) for p in ps)),
    "keep_step": ("keep_old_new_*.json", _old_new_files),
}


COLLECT = {  # file a GPU script writes to $OUT -> its name under docs/results ({gpu}: e.g. h200)
    "compare_kernels.json": "compare_kernels_renovation_{gpu}.json",
    "step_time_old_new.json": "step_time_old_new_{gpu}.json",
    "msa_patterns.json": "msa_patterns_{gpu}.json",
    "msa_attention.json": "msa_attention_{gpu}.json",
    "msa_attention_headline.json": "msa_attention_headline_{gpu}.json",
    "train_step_small.json": "train_step_small_{gpu}.json",
    "train_step_base.json": "train_step_base_{gpu}.json",
    "train_step_base_1m.json": "train_step_base_1m_{gpu}.json",
    "train_step_base_1m_tiled.json": "train_step_base_1m_tiled_{gpu}.json",
    "train_step_base_1m_offload.json": "train_step_base_1m_offload_{gpu}.json",
    "train_step_small_1m.json": "train_step_small_1m_{gpu}.json",
    "train_step_small_1m_both.json": "train_step_small_1m_both_{gpu}.json",  # STAGES=dense_1m
    "train_step_small_1m_window_both.json": "train_step_small_1m_window_both_{gpu}.json",  # STAGES=first_layer_1m
    "train_step_small_1m_dense0.json": "train_step_small_1m_dense0_{gpu}.json",
    "train_step_base_1m_window.json": "train_step_base_1m_window_{gpu}.json",  # STAGES=base_1m_window
    "train_step_base_1m_window_nokeep.json": "train_step_base_1m_window_nokeep_{gpu}.json",  # its A/B (3o)
    "train_step_1b.json": "train_step_1b_{gpu}.json",
    # STAGES=1b_long: how far up one GPU takes 1b
    **{f"train_step_1b_{n}.json": f"train_step_1b_{n}_{{gpu}}.json" for n in ("512k", "512k_offload", "1m_offload")},
    "train_step_small_dense1.json": "train_step_small_dense1_{gpu}.json",
    "train_step_small_dense0.json": "train_step_small_dense0_{gpu}.json",
    "train_step_small_window.json": "train_step_small_window_{gpu}.json",
    "train_step_small_compiled.json": "train_step_small_compiled_{gpu}.json",
    "train_step_small_host.json": "host_profile_small_{gpu}.json",  # not a train_step table: its own section
    # STAGES=kl_stride: the strided index KL (attention.kl_query_stride), one JSON per stride
    **{f"train_step_small_kl_stride{s}.json": f"train_step_small_kl_stride{s}_{{gpu}}.json" for s in (1, 2, 4, 8)},
    # the selective-checkpointing change (msa.keep) against the commit before it, scaling.md section 1
    **{f"step_time_old_new_{n}.json": f"keep_old_new_{n // 1024}k_{{gpu}}.json" for n in (16384, 32768, 131072)},
}


def results_name(filename: str, gpu: str) -> str | None:
    """The docs/results name of a GPU script's output file (None: not a result file), ``gpu`` as the JSON
    names it (``NVIDIA H200`` -> ``h200``)."""
    pattern = COLLECT.get(filename)
    return pattern.format(gpu=gpu_slug(gpu)) if pattern else None


def gpu_slug(gpu: str) -> str:
    """A card's short name as result files carry it (``NVIDIA H100 80GB HBM3`` -> ``h100``)."""
    return gpu.lower().replace("nvidia", "").split()[0] if gpu.strip() else "gpu"


def collect(folder: Path, results: Path = RESULTS) -> list[Path]:
    """Copy the result JSONs a GPU call brought back (``files_at``) into docs/results under their names."""
    done = []
    for path in sorted(folder.rglob("*.json")):
        data = json.loads(path.read_text())
        name = results_name(path.name, data.get("meta", {}).get("gpu", ""))
        if name:
            (results / name).write_text(path.read_text())
            done.append(results / name)
    return done


def replace_block(text: str, name: str, content: str) -> tuple[str, bool]:
    """``text`` with the block ``name`` replaced by ``content``; False if the markers are not there."""
    pattern = re.compile(rf"(<!-- begin: {re.escape(name)} -->\n).*?(<!-- end: {re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        return text, False
    return pattern.sub(lambda m: m.group(1) + content.rstrip("\n") + "\n" + m.group(2), text), True


def render_all(results: Path = RESULTS) -> dict[str, str | None]:
    out = {}
    for name, (pattern, fn) in BLOCKS.items():
        paths = sorted(glob.glob(str(results / pattern)))
        out[name] = fn(paths) if paths else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="replace the marked blocks in docs/*.md and README.md")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--collect", type=Path, default=None,
                    help="first copy the result JSONs under this folder (a GPU call's files) into --results")
    args = ap.parse_args()
    if args.collect:
        for path in collect(args.collect, args.results):
            print(f"collected {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    blocks = render_all(args.results)
    for name, content in blocks.items():
        print(f"<!-- {name} -->\n{content if content is not None else '(no JSON yet: ' + BLOCKS[name][0] + ')'}\n")
    if not args.write:
        return
    for md in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
        text = md.read_text()
        new = text
        for name, content in blocks.items():
            if content is not None:
                new, _ = replace_block(new, name, content)
        if new != text:
            md.write_text(new)
            print(f"wrote {md.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
