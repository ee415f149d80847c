"""One training step of two source trees side by side: the renovation's acceptance check (issue 11).

Each tree runs in its own worker process (``PYTHONPATH`` = that tree first, so ``train``, ``msa`` and
``kernels`` are its own), builds the model and DeepSpeed engine with the same config and seed, and
steps the same synthetic one-document row (``input_ids`` from a seeded generator, labels shifted,
no ``cu_seqlens``; with ``--doc-len`` packed documents of that length instead), sparse MSA phase.
After one warm-up step in each worker, the parent asks them in turn, ``--rounds`` times (old, new,
old, new, ...), for ``--steps`` timed steps each, so drift of the machine shows up in both. It
records per tree the first step's loss (LM and KL: same weights, same row, so they agree within
bf16 rounding if the trees compute the same thing), every timed step, the medians per round and
overall, and peak memory.

The two trees' APIs differ: commit 8eed98b and before (``train.loop.train_step(engine, model, batches,
cfg, stage, env, layer_stats)``, ``train.parallel.build_engine(model, cfg, env)``, ``model.set_phase``,
keys ``train.*`` and ``attention.backend``) and the renovated one (``train.loop.start`` and
``train_step(run)``, keys ``run.*``, ``recipe.*``); the worker picks by what ``train.loop`` has.

    python3 bench/step_time_old_new.py --old .old --new . --model small --seq-len 131072 \\
        --rounds 2 --steps 2 --json out.json [-- overrides for both trees]
    python3 bench/step_time_old_new.py --render out.json

``--device cpu`` runs the workers on the CPU (e.g. ``--model tiny --seq-len 256``) to check the script.
The JSON is rewritten after every reply, so a run stopped from outside keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MARK = "@@"  # protocol lines from a worker start with this; everything else it prints is passed through


# ----------------------------------------------------------------------------- worker (runs in either tree)

def _batch(seq_len: int, vocab: int, seed: int, doc_len: int = 0) -> dict:
    """One row of ``seq_len`` seeded tokens: one document, or with ``doc_len`` packed documents of ``doc_len``
    tokens (the last one shorter) with their ``cu_seqlens`` and positions restarting at each."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq_len), generator=g)
    labels = torch.roll(ids, -1, 1)
    if not doc_len or doc_len >= seq_len:
        labels[0, -1] = -100
        return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(seq_len)[None]}
    cu = torch.tensor([*range(0, seq_len, doc_len), seq_len], dtype=torch.int32)
    labels[0, cu[1:].long() - 1] = -100  # no target across a document's end
    pos = torch.arange(seq_len) - cu[:-1].long().repeat_interleave(torch.diff(cu).long())
    return {"input_ids": ids, "labels": labels, "position_ids": pos[None], "cu_seqlens": cu}


def _compose(tree: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from train.config import register_schema, to_train_config

    register_schema()
    with initialize_config_dir(config_dir=str(tree / "conf"), version_base="1.3"):
        return to_train_config(compose("train", overrides=overrides))


def _old_stepper(tree, args, batch_of):
    """Commit 8eed98b's API."""
    import types

    import torch

    from train.config import check_config
    from train.loop import train_step
    from train.metrics import LayerStats
    from train.model import build_model
    from train.parallel import build_engine, init_distributed

    cfg = _compose(tree, [f"model={args.model}", "logging.wandb.mode=disabled", "data.batch_size=1",
                          f"data.seq_len={args.seq_len}", f"train.precision={args.precision}", *args.overrides])
    env = init_distributed(cfg.parallel)
    check_config(cfg, env.world_size, vocab_size=cfg.model.vocab_size)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.attention)
    engine, _, _ = build_engine(model, cfg, env)
    model.set_phase("sparse")
    stats = LayerStats(model)
    stage = types.SimpleNamespace(kl_weight=cfg.attention.kl_weight)
    batch = batch_of(cfg.model.vocab_size)

    def step():
        out = train_step(engine, model, iter([batch] * cfg.train.grad_accum), cfg, stage, env, stats)
        return out["lm"], out["kl"], stage.kl_weight
    return step, env.device


def _new_stepper(tree, args, batch_of):
    """The renovated API (``train.loop.start``)."""
    import itertools

    from train.config import check_config
    from train.loop import start, train_step
    from train.parallel import init_distributed
    from train.recipe import build_recipe

    cfg = _compose(tree, [f"model={args.model}", "logging.wandb.mode=disabled", "data.batch_size=1",
                          f"data.seq_len={args.seq_len}", f"run.precision={args.precision}",
                          "recipe.warmup_steps=0", *args.overrides])
    env = init_distributed(cfg.parallel)
    stage = build_recipe(cfg)[-1]
    check_config(cfg, stage, env.world_size, cfg.model.vocab_size, env.device.type)
    run = start(cfg, env, [stage], stage, None, batches=itertools.repeat(batch_of(cfg.model.vocab_size)))

    def step():
        out = train_step(run)
        return out["lm"], out["kl"], stage.kl_weight
    return step, env.device


def worker(args) -> None:
    """Build, warm up, then answer ``steps K`` / ``quit`` lines on stdin with ``@@`` JSON lines."""
    import torch

    tree = Path(args.tree).resolve()
    t0 = time.perf_counter()
    import train.loop

    api = "new" if hasattr(train.loop, "start") else "old"
    make = _new_stepper if api == "new" else _old_stepper
    step, device = make(tree, args, lambda vocab: _batch(args.seq_len, vocab, args.seed, args.doc_len))
    cuda = device.type == "cuda"

    def timed():
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    build_s = time.perf_counter() - t0
    warm_s, (lm, kl, w) = timed()
    reply({"ready": True, "api": api, "tree": str(tree), "train_module": train.loop.__file__,
           "build_s": round(build_s, 2), "warmup_s": round(warm_s, 3), "lm_first": lm, "kl_first": kl,
           "loss_first": lm + w * kl, "kl_weight": w})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = [timed()[0] for _ in range(int(cmd[1]))]
        reply({"step_s": [round(t, 4) for t in times],
               "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None})


def reply(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- parent

class Worker:
    def __init__(self, name: str, tree: Path, args):
        self.name, self.tree = name, tree
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
        cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--worker", "--tree", str(tree),
               "--model", args.model, "--seq-len", str(args.seq_len), "--seed", str(args.seed),
               "--doc-len", str(args.doc_len), "--precision", args.precision, "--", *args.overrides]
        self.proc = subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)

    def read(self) -> dict:
        """The worker's next ``@@`` line; its other output goes to this process's stdout, prefixed."""
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
            sys.stdout.write(f"[{self.name}] {line}")
        return {"error": f"worker exited with status {self.proc.wait()}"}

    def ask(self, steps: int) -> dict:
        try:
            self.proc.stdin.write(f"steps {steps}\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            return {"error": f"worker gone (status {self.proc.poll()})"}
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def summarize(res: dict) -> dict:
    """Medians per tree over every timed step, the new/old ratio, and the spread that says what noise is."""
    out = {}
    for name in ("old", "new"):
        steps = [t for r in res["rounds"] for t in r.get(name, {}).get("step_s", [])]
        if steps:
            med = statistics.median(steps)
            out[name] = {"median_s": round(med, 4), "min_s": min(steps), "max_s": max(steps), "n": len(steps),
                         "spread": round((max(steps) - min(steps)) / med, 4)}
    if "old" in out and "new" in out:
        ratio = out["new"]["median_s"] / out["old"]["median_s"]
        noise = max(out["old"]["spread"], out["new"]["spread"])
        out["new_over_old"] = round(ratio, 4)
        out["within_spread"] = abs(ratio - 1) <= noise
        out["note"] = f"largest spread (max - min) / median of either tree's timed steps {noise:.4f}"
    ready = res.get("ready", {})
    if all(ready.get(n, {}).get("loss_first") is not None for n in ("old", "new")):
        a, b = ready["old"], ready["new"]
        out["loss_first"] = {"old": a["loss_first"], "new": b["loss_first"],
                             "rel_diff": abs(a["loss_first"] - b["loss_first"]) / abs(a["loss_first"]),
                             "lm_rel_diff": abs(a["lm_first"] - b["lm_first"]) / abs(a["lm_first"]),
                             "kl_rel_diff": abs(a["kl_first"] - b["kl_first"]) / max(abs(a["kl_first"]), 1e-30)}
    return out


def parent(args) -> None:
    import torch

    from bench.meta import git_commit

    trees = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    res = {"meta": {"command": " ".join(["python3", *sys.argv]), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                             time.gmtime()),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__, "commit": git_commit(), "old_tree": str(trees["old"]),
                    "old_commit": args.old_commit, "model": args.model, "seq_len": args.seq_len,
                    "doc_len": args.doc_len, "seed": args.seed, "precision": args.precision,
                    "overrides": args.overrides, "rounds": args.rounds, "steps": args.steps},
           "ready": {}, "rounds": []}

    def save():
        res["summary"] = summarize(res)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    workers = {}
    try:
        for name in ("old", "new"):  # one at a time: the first compiles while the other waits
            workers[name] = Worker(name, trees[name], args)
            res["ready"][name] = workers[name].read()
            print(f"{name}: {json.dumps(res['ready'][name])}", flush=True)
            save()
        for r in range(args.rounds):
            entry = {}
            res["rounds"].append(entry)
            for name in ("old", "new"):
                if "error" in res["ready"][name]:
                    continue
                entry[name] = workers[name].ask(args.steps)
                print(f"round {r} {name}: {json.dumps(entry[name])}", flush=True)
                save()
    finally:
        for w in workers.values():
            w.close()
        save()
    print(render(res))


def render(res: dict) -> str:
    """Markdown of a result: one row per tree, then the verdict numbers."""
    m, s = res["meta"], res.get("summary") or summarize(res)
    row = f"documents of {m['doc_len']}" if m.get("doc_len") else "one document"
    lines = [f"{m['gpu']}, torch {m['torch']}; model {m['model']}, {m['seq_len']} tokens ({row}), "
             f"{m['precision']}, overrides `{' '.join(m['overrides'])}`; new tree at `{m['commit']}`, old tree "
             f"`{m.get('old_commit') or m['old_tree']}`; {m['date_utc']}; command `{m['command']}`", "",
             "| tree | first-step loss (LM + KL) | warm-up step s | timed steps s, by round | median s | peak GB |",
             "|---|---|---|---|---|---|"]
    for name in ("old", "new"):
        ready = res["ready"].get(name, {})
        if "error" in ready or not ready:
            lines.append(f"| {name} | {ready.get('error', 'not started')} | | | | |")
            continue
        rounds = " / ".join(", ".join(f"{t:.3f}" for t in r.get(name, {}).get("step_s", [])) for r in res["rounds"])
        peaks = [r[name]["peak_gb"] for r in res["rounds"] if r.get(name, {}).get("peak_gb") is not None]
        med = s.get(name, {}).get("median_s")
        lines.append(f"| {name} | {ready['loss_first']:.5f} ({ready['lm_first']:.5f} + {ready['kl_weight']:g} x "
                     f"{ready['kl_first']:.5f}) | {ready['warmup_s']:.2f} | {rounds} | "
                     f"{med if med is not None else ''} | {max(peaks) if peaks else ''} |")
    if "new_over_old" in s:
        lines += ["", f"new / old median step: {s['new_over_old']:.4f}; {s['note']}."]
    if "loss_first" in s:
        lf = s["loss_first"]
        lines.append(f"First-step loss relative difference {lf['rel_diff']:.2e} (LM {lf['lm_rel_diff']:.2e}, "
                     f"KL {lf['kl_rel_diff']:.2e}).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--old", default=".old", help="root of the old tree (git archive of the old commit)")
    ap.add_argument("--new", default=".", help="root of the new tree")
    ap.add_argument("--old-commit", default="8eed98b", help="recorded in the JSON")
    ap.add_argument("--model", default="small")
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic row")
    ap.add_argument("--doc-len", type=int, default=0,
                    help="packed documents of this many tokens (cu_seqlens); 0: one document")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per tree per round")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: hide the GPU from the workers")
    ap.add_argument("--json", default=None)
    ap.add_argument("--render", default=None, help="print the markdown of a result JSON and exit")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides given to both trees")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
    elif args.worker:
        # run as a script, this file's folder leads sys.path: drop it, so bench/*.py (data, parallel, ...)
        # cannot shadow a module of the tree under test or of a library
        here = Path(__file__).resolve().parent
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
        worker(args)
    else:
        if args.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        parent(args)


if __name__ == "__main__":
    main()
