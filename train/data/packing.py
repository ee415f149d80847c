"""Packing documents into rows of `seq_len` tokens.

Documents are laid end to end; one that does not fit the rest of a row is split and continues at
the start of the next row (a split never cuts through an image: it moves before the image's `<img>`
and the row is padded instead). A document marked `whole` (a synthetic retrieval item: its question
is useless without its needles) that fits in a row is never split: it starts the next row instead.
Each piece of a document is its own attention segment: position ids restart at 0, its last position
has no target, and it never sees another piece. Padding at the end of a row is one more segment. A row
remembers where its reader was (the document being packed, how many of its tokens are used, the skip
counters) so that a resume continues exactly after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

IGNORE = -100


@dataclass
class Row:
    tokens: torch.Tensor  # int32 [N]
    labels: torch.Tensor  # int32 [N], IGNORE where no loss
    positions: torch.Tensor  # int32 [N]
    seg_lens: list[int]  # attention segments in order (document pieces, then padding), sum N
    patches: torch.Tensor  # uint8 [P, p*p*3], in slot order
    slots: torch.Tensor  # int64 [P], indices into the row
    grids: list[tuple[int, int]]  # (rows, cols) of each image in the row, in slot order
    pieces: list[tuple[str, int, int, int]] = field(default_factory=list)  # (key, epoch, start, end)
    sources: list[int] = field(default_factory=list)  # each piece's data.sources entry (0 without sources)
    answers: list[tuple[int, int]] = field(default_factory=list)  # row positions [lo, hi) whose targets are
    # a synthetic item's answer tokens
    state: dict = field(default_factory=dict)  # reader position after this row


def piece_labels(tokens: np.ndarray, img_patch: int) -> np.ndarray:
    """Next-token targets within one piece; no target at its end, at patches, or on a patch."""
    labels = np.full(len(tokens), IGNORE, dtype=np.int32)
    labels[:-1] = tokens[1:]
    labels[(tokens == img_patch) | (labels == img_patch)] = IGNORE
    return labels


def _cut(doc, start: int, end: int) -> int:
    """Move a piece's end out of any image it would cut (to just before that image's `<img>`)."""
    for first_patch, patches, _ in doc.images:
        lo, hi = first_patch - 1, first_patch + len(patches) + 1
        if lo < end < hi:
            return max(lo, start)
    return end


class Packer:
    """Rows of `seq_len` tokens from a ShardReader's documents, with their resume state."""

    def __init__(self, reader, seq_len: int, pad_id: int, img_patch: int, patch_dim: int):
        self.reader, self.seq_len = reader, seq_len
        self.pad_id, self.img_patch, self.patch_dim = pad_id, img_patch, patch_dim

    def rows(self, state: dict | None = None):
        state = state or {}
        if "skipped" in state:
            self.reader.skipped.update(state["skipped"])
        docs = self.reader.documents(state.get("pos"))
        doc, pos = next(docs)
        used = state.get("used", 0)
        while True:
            row, used = self._fill(docs, doc, pos, used)
            doc, pos = row.pop("doc"), row.pop("pos")
            yield Row(**row, state={"pos": pos.to_dict(), "used": used, "skipped": dict(self.reader.skipped)})

    def _fill(self, docs, doc, pos, used):
        N = self.seq_len
        toks, labs, poss, segs, patches, slots, grids, pieces, sources, answers = ([] for _ in range(10))
        fill = 0
        while fill < N:
            if used >= len(doc.tokens):
                doc, pos = next(docs)
                used = 0
            if doc.whole and used == 0 and 0 < N - fill < len(doc.tokens) <= N:
                break  # a document that must stay whole starts the next row; this one is padded
            end = _cut(doc, used, min(len(doc.tokens), used + N - fill))
            if end == used:  # the next image does not fit in this row: pad and start it in the next
                if fill == 0:
                    raise ValueError(f"an image of {doc.key} is longer than seq_len={N}: lower data.image.max_patches")
                break
            piece = doc.tokens[used:end]
            toks.append(piece)
            labs.append(piece_labels(piece, self.img_patch))
            poss.append(np.arange(len(piece), dtype=np.int32))
            for first_patch, p, grid in doc.images:
                if used <= first_patch < end:
                    patches.append(p)
                    slots.append(np.arange(len(p)) + fill + first_patch - used)
                    grids.append(grid)
            segs.append(len(piece))
            pieces.append((doc.key, pos.epoch, used, end))
            sources.append(getattr(pos, "source", 0))  # a MixedReader's position names its source
            if doc.answer is not None:  # position i's target is token i + 1; a piece's last position has none
                lo, hi = max(doc.answer[0] - 1, used), min(doc.answer[1] - 1, end - 1)
                if lo < hi:
                    answers.append((fill + lo - used, fill + hi - used))
            fill += len(piece)
            used = end
        if fill < N:
            toks.append(np.full(N - fill, self.pad_id, dtype=np.int32))
            labs.append(np.full(N - fill, IGNORE, dtype=np.int32))
            poss.append(np.arange(N - fill, dtype=np.int32))
            segs.append(N - fill)
        row = dict(
            tokens=torch.from_numpy(np.concatenate(toks)),
            labels=torch.from_numpy(np.concatenate(labs)),
            positions=torch.from_numpy(np.concatenate(poss)),
            seg_lens=segs,
            patches=torch.from_numpy(np.concatenate(patches) if patches else np.zeros((0, self.patch_dim), np.uint8)),
            slots=torch.from_numpy(np.concatenate(slots) if slots else np.zeros(0, np.int64)).long(),
            grids=grids,
            pieces=pieces,
            sources=sources,
            answers=answers,
            doc=doc,
            pos=pos,
        )
        return row, used
