"""Run the evals on a model: ``evaluate(model, tokenizer, spec, ...)`` returns a results dict (see
``docs/evals.md``), ``flatten(results)`` its ``eval/...`` metrics.

Every forward goes through ``train.generate.extend``: the model's own attention cores on the cached
sequence, so MSA selects blocks as in training. Per length:

- ``bpb``: ``rows`` windows of ``L + 1`` held-out tokens, evenly spaced over the held-out stream; bits
  per byte = summed next-token NLL (nats) / (ln 2 x the target tokens' UTF-8 bytes), overall and per
  position bucket; MSA's selection stats on the same rows give the index recall (overall and per layer).
- each retrieval task: ``items`` items per depth. The prompt is run once; each candidate answer is scored
  by its summed log-probability after it (``choice``: the answer strictly above every alternative;
  ``share``: the answer's share of the candidates' probability, a continuous ``choice``),
  ``nll``: the answer's mean NLL per token; with ``spec.generate`` greedy decoding from the same cache
  gives ``exact`` (normalised output == answer). The MSA layers' blocks for the question's tokens give
  the needle recall: the share of the needle-holding blocks they select.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from msa.stats import SelectionStats
from train.data.text_stream import TextStream, encode
from train.eval.config import BPB, EvalSpec, eval_rope
from train.eval.tasks import answer_share, choice_correct, eval_item, exact_match
from train.generate import KVCache, Prompt, decode, extend, logits_of, own_core, patch_dim, prompt_batch

LN2 = math.log(2.0)
_STREAMS: dict = {}


def fmt_tokens(n: int) -> str:
    """1024 -> 1K, 65536 -> 64K, 1048576 -> 1M, 300 -> 300 (names of lengths and position buckets)."""
    for size, unit in ((2**20, "M"), (2**10, "K")):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def heldout_stream(spec_heldout, tokenizer, heldout_every: int):
    """The held-out text (cached per process: the evals of one run read it once)."""
    key = (str(spec_heldout), id(tokenizer), heldout_every)
    if key not in _STREAMS:
        _STREAMS[key] = (TextStream.stdlib(tokenizer, heldout_every, heldout=True) if spec_heldout == "default"
                         else TextStream.shards(spec_heldout, tokenizer))
    return _STREAMS[key]


def token_bytes(tokenizer) -> np.ndarray:
    """UTF-8 bytes of each id as text (0 for special ids); the byte tokenizer's are exactly 1 per byte
    id. For other tokenizers an id decoded alone can differ from its bytes in context (docs/evals.md)."""
    from train.data.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return (np.arange(tokenizer.vocab_size) < 256).astype(np.int64)
    special = {tokenizer.eod, tokenizer.pad, tokenizer.img_start, tokenizer.img_end, tokenizer.img_patch}
    return np.array([0 if i in special else len(tokenizer.decode([i]).encode("utf-8"))
                     for i in range(tokenizer.vocab_size)], dtype=np.int64)


def buckets(length: int, edges: list[int]) -> list[tuple[int, int]]:
    """Position ranges ``[lo, hi)`` from the edges, cut at ``length``: 0-edge0, edge0-edge1, ..."""
    out, lo = [], 0
    for hi in [*[e for e in edges if e < length], length]:
        out.append((lo, hi))
        lo = hi
    return out


def bits_per_byte(nll: np.ndarray, nbytes: np.ndarray) -> float | None:
    """Summed NLL in nats over ln 2 times the bytes it predicted (None for no bytes)."""
    total = float(nbytes.sum())
    return float(nll.sum()) / (LN2 * total) if total else None


def bucket_bpb(nll: np.ndarray, nbytes: np.ndarray, edges: list[int]) -> dict[str, float | None]:
    """Bits per byte of ``nll, nbytes [rows, L]`` (the target of position ``i`` is token ``i + 1``) by
    position bucket, named like ``0-1K``."""
    L = nll.shape[-1]
    return {f"{fmt_tokens(lo)}-{fmt_tokens(hi)}": bits_per_byte(nll[..., lo:hi], nbytes[..., lo:hi])
            for lo, hi in buckets(L, edges)}


def needle_recall(selected: torch.Tensor, spans: list[list[tuple[int, int]]], block_size: int) -> list[float]:
    """Per row of ``selected [B, Hkv, q, topk]`` (the blocks the question's queries chose; -1 unused):
    the mean over groups and queries of the share of needle-holding blocks selected."""
    out = []
    for b, row_spans in enumerate(spans):
        blocks = sorted({t // block_size for s, e in row_spans for t in range(s, e)})
        hit = torch.isin(selected[b], torch.as_tensor(blocks, device=selected.device, dtype=selected.dtype))
        out.append(float(hit.sum(-1).double().mean()) / len(blocks))
    return out


def needle_hit_groups(selected: torch.Tensor, spans: list[list[tuple[int, int]]], block_size: int) -> list[list[float]]:
    """Per row of ``selected [B, Hkv, q, topk]`` and per group: the mean over queries and needles of whether
    the query selected at least one block of the needle. One block of a needle can hold all the answer needs
    (a pass key's 60 tokens span up to three 32-token blocks and hold the key twice), so this asks whether
    the needle was found, where ``needle_recall`` asks what share of its blocks were. A model needs one
    head that finds the needle, and that head's group is the same on every item: per group, a layer whose
    retrieving group always finds it reads 1.0 there, whatever the other groups select."""
    out = []
    for b, row_spans in enumerate(spans):
        hits = [torch.isin(selected[b], torch.as_tensor(sorted({t // block_size for t in range(s, e)}),
                                                        device=selected.device, dtype=selected.dtype)).any(-1)
                for s, e in row_spans]  # each [Hkv, q]
        out.append(torch.stack(hits).double().mean(dim=(0, 2)).tolist())
    return out


def needle_hit(selected: torch.Tensor, spans: list[list[tuple[int, int]]], block_size: int) -> list[float]:
    """``needle_hit_groups`` averaged over the groups: per row, the mean over groups, queries and needles."""
    return [float(np.mean(g)) for g in needle_hit_groups(selected, spans, block_size)]


def token_nll(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Next-token NLL (nats, float32) ``[B, L]`` of ``targets [B, L]`` from ``hidden [B, L, dim]``, a chunk of
    positions at a time (never ``B x L x vocab`` logits at once)."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
    for s in range(0, targets.shape[1], chunk):
        logits = logits_of(model, hidden[:, s:s + chunk])
        out[:, s:s + chunk] = F.cross_entropy(logits.transpose(1, 2), targets[:, s:s + chunk], reduction="none")
    return out


def _recall_table(stats: list[SelectionStats], layer_ids: list[int]) -> dict:
    ratios = [s.ratios() for s in stats]
    total = SelectionStats.pooled(stats).ratios()
    return {"all": total["index_recall"], "oracle": total["oracle_recall"], "oracle_2x": total["oracle_recall_2x"],
            "sparsity": total["sparsity"], "tile_union": total["tile_union"],
            "layers": {str(i): r["index_recall"] for i, r in zip(layer_ids, ratios)},
            "oracle_layers": {str(i): r["oracle_recall"] for i, r in zip(layer_ids, ratios)},
            "oracle_2x_layers": {str(i): r["oracle_recall_2x"] for i, r in zip(layer_ids, ratios)}}


@torch.no_grad()
def perplexity(model, tokenizer, spec: EvalSpec, length: int, stream, phase: str) -> dict:
    """Bits per byte (overall, by position) and index recall on ``spec.rows`` held-out windows of the stream,
    and under ``doc`` the same on ``spec.doc_rows`` windows inside single held-out documents
    (``TextStream.document_windows``), or why there are none."""
    if len(stream) < length + 1:
        raise ValueError(f"eval.lengths: {length} needs {length + 1} held-out tokens, {stream.name} has "
                         f"{len(stream)}: lower the length or give eval.heldout more text")
    starts = np.linspace(0, len(stream) - length - 1, spec.rows).round().astype(int)
    result = _heldout_windows(model, tokenizer, spec, length, stream, phase, starts)
    if spec.doc_rows > 0:
        doc_starts = stream.document_windows(length + 1, spec.doc_rows)
        if len(doc_starts):
            result["doc"] = _heldout_windows(model, tokenizer, spec, length, stream, phase, doc_starts)
            result["doc"]["documents"] = int((stream.doc_lengths() >= length + 1).sum())
        else:
            result["doc"] = {"skipped": f"no document of {stream.name} holds {length + 1} tokens (the longest "
                                        f"{int(stream.doc_lengths().max())}): no windows inside one document"}
    return result


def _heldout_windows(model, tokenizer, spec: EvalSpec, length: int, stream, phase: str, starts) -> dict:
    device = next(model.parameters()).device
    table = torch.as_tensor(token_bytes(tokenizer), device=device)
    per_batch = max(1, spec.batch_tokens // length)
    nll, nbytes, stats = [], [], None
    for i in range(0, len(starts), per_batch):
        ids = torch.as_tensor(np.stack([stream.window(s, length + 1) for s in starts[i:i + per_batch]]),
                              dtype=torch.long, device=device)
        cache = KVCache(model, len(ids), length)
        out = extend(model, cache, {"input_ids": ids[:, :-1]}, phase, stats_queries=spec.recall_queries)
        nll.append(token_nll(model, out.hidden, ids[:, 1:]).cpu().numpy())
        nbytes.append(table[ids[:, 1:]].cpu().numpy())
        if out.stats:
            stats = out.stats if stats is None else [a + b for a, b in zip(stats, out.stats)]
    nll, nbytes = np.concatenate(nll), np.concatenate(nbytes)
    result = {"bpb": bits_per_byte(nll, nbytes), "buckets": bucket_bpb(nll, nbytes, spec.buckets),
              "rows": len(starts), "starts": [int(s) for s in starts], "tokens": int(nll.size),
              "bytes": int(nbytes.sum())}
    if stats:
        result["index_recall"] = _recall_table(stats, model.msa_layers())
    return result


def _candidate_logliks(model, cache: KVCache, first: torch.Tensor, candidates: list[list[np.ndarray]], phase: str):
    """``[B, C]`` summed log-probabilities of each row's candidates after its prompt (the cache holds the
    prompts; ``first [B, V]`` are the logits after them). Rows' candidates of unequal length are padded:
    the padding comes after the scored ids, so causal attention keeps it out of their scores."""
    B, C = len(candidates), len(candidates[0])
    out = torch.zeros(B, C, dtype=torch.float64)
    n = cache.length
    first_lp = torch.log_softmax(first.float(), -1)
    for c in range(C):
        ids = [row[c] for row in candidates]
        width = max(len(t) for t in ids)
        padded = torch.zeros(B, width, dtype=torch.long, device=first.device)
        for b, t in enumerate(ids):
            padded[b, :len(t)] = torch.as_tensor(t, dtype=torch.long)
        lp = first_lp.gather(-1, padded[:, :1]).squeeze(-1)
        total = lp.double().cpu()
        if width > 1:
            h = extend(model, cache, {"input_ids": padded[:, :-1]}, phase).hidden
            rest = torch.log_softmax(logits_of(model, h), -1).gather(-1, padded[:, 1:, None]).squeeze(-1)
            mask = torch.as_tensor([[j + 1 < len(t) for j in range(width - 1)] for t in ids], device=rest.device)
            total += (rest * mask).sum(-1).double().cpu()
            cache.truncate(n)
        out[:, c] = total
    return out


def generated_text(tokenizer, ids: list[int]) -> str:
    """A greedy answer as text, without the end-of-document id that ends it. The synthetic training
    documents end right after their answer, so a model that learned them stops there; decoded, that id
    reads as the tokenizer's end marker, and no answer followed by it would match."""
    if ids and ids[-1] == tokenizer.eod:
        ids = ids[:-1]
    return tokenizer.decode(ids)


@torch.no_grad()
def retrieval(model, tokenizer, spec: EvalSpec, task: str, length: int, stream, phase: str, image_cfg) -> dict:
    """Scores of ``task`` at ``length``: per depth and overall, plus the needle recall per MSA layer."""
    device = next(model.parameters()).device
    items = [(d, eval_item(task, length, di, d, i, spec.seed, tokenizer, stream, image_cfg, spec.choices))
             for di, d in enumerate(spec.depths) for i in range(spec.items)]
    groups: dict[int, list] = defaultdict(list)
    for depth, item in items:
        groups[item.prompt_len].append((depth, item))
    scores, recalls, hits, hit_groups = [], defaultdict(list), defaultdict(list), defaultdict(list)
    msa = [own_core(b.attn) for b in model.layers if hasattr(b.attn, "index_dim")]
    per_batch = max(1, spec.batch_tokens // length)
    for prompt_len, group in groups.items():
        for i in range(0, len(group), per_batch):
            part = group[i:i + per_batch]
            cands = [[encode(tokenizer, c) for c in it.candidates] for _, it in part]
            new = max(len(c) for row in cands for c in row) + 2
            cache = KVCache(model, len(part), prompt_len + new)
            batch = prompt_batch([Prompt(it.prompt, it.images) for _, it in part], device, patch_dim(model))
            question = min(it.question_len for _, it in part)
            out = extend(model, cache, batch, phase, select_last=question)
            hidden = out.hidden[:, -1]
            logliks = _candidate_logliks(model, cache, logits_of(model, hidden), cands, phase)
            generated = [None] * len(part)
            if spec.generate:
                done = decode(model, cache, hidden, new, stop_ids=(tokenizer.eod,), phase=phase)
                generated = [generated_text(tokenizer, c.ids) for c in done]
            trivial = -(-prompt_len // msa[0].block_size) <= msa[0].topk if msa else True
            spans = [it.needle_spans for _, it in part]
            # with at most topk blocks every block is selected: nothing to measure. The share of the needles'
            # blocks over the question's tokens; whether each needle is found at the question's last token,
            # the query whose output predicts the answer's first token
            per_layer = [] if trivial else [needle_recall(sel, spans, msa[0].block_size) for sel in out.selected]
            per_layer_groups = [] if trivial else [needle_hit_groups(sel[:, :, -1:], spans, msa[0].block_size)
                                                    for sel in out.selected]
            per_layer_hit = [[float(np.mean(g)) for g in rows] for rows in per_layer_groups]
            for layer, vals, hit, by_group in zip(model.msa_layers(), per_layer, per_layer_hit, per_layer_groups):
                recalls[layer] += vals
                hits[layer] += hit
                hit_groups[layer] += by_group
            item_recall = [float(np.mean(v)) for v in zip(*per_layer)] if per_layer else [None] * len(part)
            item_hit = [float(np.mean(v)) for v in zip(*per_layer_hit)] if per_layer_hit else [None] * len(part)
            for b, (depth, it) in enumerate(part):
                scores.append({"depth": depth, "choice": choice_correct(logliks[b].tolist()),
                               "share": answer_share(logliks[b].tolist()),
                               "nll": -float(logliks[b, 0]) / len(cands[b][0]),
                               "exact": None if generated[b] is None else exact_match(it, generated[b]),
                               "needle": item_recall[b], "needle_hit": item_hit[b]})
    return summarise(scores, recalls, spec.depths, hits, hit_groups)


def summarise(scores: list[dict], recalls: dict[int, list[float]], depths: list[float],
              hits: dict[int, list[float]] | None = None,
              hit_groups: dict[int, list[list[float]]] | None = None) -> dict:
    """Accuracy (share of True) of ``choice`` and ``exact``, mean ``nll``, overall, per depth and over the
    needles below depth 1 (``far``; ``None`` without such depths: ``eval/<task>/<L>/choice_far``, ``share_far``);
    the needle recall over all items and layers, per layer, and over the items answered correctly (``choice``; each
    item's recall the mean over layers): the issue's "needle recall where the model answers correctly";
    and per depth (``needle``, each item's recall the mean over layers): a needle next to the question
    (depth 1) can lie in the question's own block, which every query selects whatever the index scores
    (with 128-token blocks a pass-key needle always does), so the overall number can have a floor that the
    far depths do not. ``hit`` (``needle_hit`` per item, from ``hits``): whether each needle has a
    block selected at the question's last token, the query whose output predicts the answer
    (``needle_hit``): the share of a needle's blocks can be low while the block the answer needs is found.
    ``hit_groups`` (``needle_hit_groups`` per item): the same per layer and group (``hit_groups``), and its
    best group per layer (``hit_best_group``): the layer's average can hide a group that always finds it."""

    def agg(rows):
        exact = [r["exact"] for r in rows if r["exact"] is not None]
        needle = [r["needle"] for r in rows if r.get("needle") is not None]
        hit = [r["needle_hit"] for r in rows if r.get("needle_hit") is not None]
        return {"choice": float(np.mean([r["choice"] for r in rows])),
                "share": float(np.mean([r["share"] for r in rows])), "nll": float(np.mean([r["nll"] for r in rows])),
                "exact": float(np.mean(exact)) if exact else None, "items": len(rows),
                "needle": float(np.mean(needle)) if needle else None,
                "needle_hit": float(np.mean(hit)) if hit else None}

    result = {**agg(scores), "depths": {str(d): agg([r for r in scores if r["depth"] == d]) for d in depths}}
    # the needles not next to the question: at depth 1 a needle can sit inside a sliding window or the
    # question's own block, so the mean over depths can read well with no far retrieval at all
    far = [r for r in scores if r["depth"] < 1.0]
    result["far"] = agg(far) if far else None
    if recalls:
        correct = [r["needle"] for r in scores if r["choice"] and r.get("needle") is not None]
        result["needle_recall"] = {"all": float(np.mean([v for vals in recalls.values() for v in vals])),
                                   "layers": {str(k): float(np.mean(v)) for k, v in recalls.items()},
                                   "correct": float(np.mean(correct)) if correct else None,
                                   "n_correct": len(correct)}
        if hits:
            hit_items = [r["needle_hit"] for r in scores if r["choice"] and r.get("needle_hit") is not None]
            result["needle_recall"].update(
                hit=float(np.mean([v for vals in hits.values() for v in vals])),
                hit_layers={str(k): float(np.mean(v)) for k, v in hits.items()},
                hit_correct=float(np.mean(hit_items)) if hit_items else None)
        if hit_groups:
            by_layer = {str(k): np.mean(np.asarray(v, dtype=float), axis=0).tolist() for k, v in hit_groups.items()}
            result["needle_recall"].update(hit_groups=by_layer,
                                           hit_best_group={k: max(v) for k, v in by_layer.items()})
    return result


@torch.no_grad()
def evaluate(model, tokenizer, spec: EvalSpec, *, train_len: int, phase: str, image_cfg, heldout_every: int,
             step: int | None = None, log=None) -> dict:
    """Every task of ``spec`` at every length (default: ``train_len``) on ``model`` in attention ``phase``."""
    t0 = time.perf_counter()
    stream = heldout_stream(spec.heldout, tokenizer, heldout_every)
    lengths = list(spec.lengths) or [train_len]
    trained_rope = (model.rope_base, model.rope_scaling)
    ropes = {length: eval_rope(spec, trained_rope, length, train_len) for length in lengths}
    results = {"step": step, "phase": phase, "train_len": train_len, "lengths": lengths,
               "depths": list(spec.depths), "rope_base": ropes[lengths[0]][0],
               "rope": {str(n): {"base": b, "scaling": asdict(sc)} for n, (b, sc) in ropes.items()},
               "msa_layers": model.msa_layers(), "bpb": {}, "retrieval": {}}
    was_training = model.training
    model.eval()
    try:
        for length in lengths:
            model.set_rope(*ropes[length])
            for task in spec.tasks:
                t = time.perf_counter()
                if task == BPB:
                    results["bpb"][str(length)] = perplexity(model, tokenizer, spec, length, stream, phase)
                    skipped = results["bpb"][str(length)].get("doc", {}).get("skipped")
                    if skipped and log:
                        log(f"eval {task} at {fmt_tokens(length)}: {skipped}")
                else:
                    results["retrieval"].setdefault(task, {})[str(length)] = retrieval(
                        model, tokenizer, spec, task, length, stream, phase, image_cfg)
                if log:
                    log(f"eval {task} at {fmt_tokens(length)}: {time.perf_counter() - t:.1f} s")
    finally:
        model.train(was_training)
        model.set_rope(*trained_rope)
    results["seconds"] = time.perf_counter() - t0
    return results


def heldout_rows(results: dict) -> list[tuple[str, str, dict]]:
    """``(length, kind, result)`` of every ``bpb`` measurement in ``results``: ``stream`` for the rows of the
    whole held-out stream, then ``document`` for the rows inside one document where they ran (not skipped)."""
    rows = [(length, "stream", r) for length, r in results["bpb"].items()]
    return rows + [(length, "document", r["doc"]) for length, r in results["bpb"].items() if "bpb" in r.get("doc", {})]


def flatten(results: dict) -> dict[str, float | None]:
    """The scalar ``eval/...`` metrics of ``results`` (per-depth and per-layer numbers stay in the JSON,
    the plots and the W&B tables)."""
    from train import metrics as M

    out = {M.EVAL_SECONDS: results["seconds"]}
    for length, kind, r in heldout_rows(results):
        name = fmt_tokens(int(length))
        suffix = "" if kind == "stream" else "_doc"  # the rows inside one document: the same keys, ending in _doc
        out[M.eval_key(f"bpb{suffix}", name)] = r["bpb"]
        out.update({M.eval_key(f"bpb{suffix}", name, b): v for b, v in r["buckets"].items()})
        if "index_recall" in r:
            out[M.eval_key(f"index_recall{suffix}", name)] = r["index_recall"]["all"]
            out[M.eval_key(f"oracle_recall{suffix}", name)] = r["index_recall"]["oracle"]
            out[M.eval_key(f"oracle_recall_2x{suffix}", name)] = r["index_recall"]["oracle_2x"]
            if not suffix:  # a kernel-design statistic, kept for the stream's rows; absent before c4f50fc
                out[M.eval_key("tile_union", name)] = r["index_recall"].get("tile_union")
    for task, by_length in results["retrieval"].items():
        for length, r in by_length.items():
            name = fmt_tokens(int(length))
            out[M.eval_key(task, name, "choice")] = r["choice"]
            out[M.eval_key(task, name, "share")] = r["share"]
            out[M.eval_key(task, name, "nll")] = r["nll"]
            if r.get("far") is not None:
                out[M.eval_key(task, name, "choice_far")] = r["far"]["choice"]
                out[M.eval_key(task, name, "share_far")] = r["far"]["share"]
            if r["exact"] is not None:
                out[M.eval_key(task, name, "exact")] = r["exact"]
            if results["msa_layers"]:
                out[M.eval_key("needle_recall", task, name)] = r.get("needle_recall", {}).get("all")
                out[M.eval_key("needle_recall", task, name, "correct")] = r.get("needle_recall", {}).get("correct")
                out[M.eval_key("needle_recall", task, name, "hit")] = r.get("needle_recall", {}).get("hit")
                out[M.eval_key("needle_recall", task, name, "hit", "correct")] = \
                    r.get("needle_recall", {}).get("hit_correct")
                for depth, d in r["depths"].items():
                    out[M.eval_key("needle_recall", task, name, "depth", depth)] = d.get("needle")
                    out[M.eval_key("needle_recall", task, name, "hit", "depth", depth)] = d.get("needle_hit")
    return out


__all__ = ["evaluate", "flatten", "heldout_rows", "perplexity", "retrieval", "bits_per_byte", "bucket_bpb", "buckets",
           "needle_recall", "needle_hit", "needle_hit_groups", "token_bytes", "fmt_tokens", "summarise"]
