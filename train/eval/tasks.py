"""Synthetic retrieval tasks with known answers, generated deterministically from a seed at any length.

An item is a haystack of plain text (a ``TextStream``: held-out text for the evals, corpus text for the
training source) with needles inserted at a depth, then a question, then the answer; prompt and answer
together are exactly the requested number of tokens. Tasks (after RULER, Hsieh et al. 2024, and the
passkey test of Mohtashami and Jaggi 2023):

- ``passkey``: one sentence holds a 5-digit pass key; asked at the end.
- ``multikey``: several "special magic number for <key>" sentences (7-digit values), one key asked; the
  others are distractors at random depths.
- ``multivalue``: one key has four values (the first at the depth, the rest later); asked for all of
  them in order of appearance; other keys are distractors.
- ``vartrack``: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... of five variables (the first at the
  depth, the rest later) and a distractor chain; asked which variables hold the value.
- ``image_needle``: a 4-digit number rendered into an image placed at the depth; asked at the end.

``TASKS`` are the eval tasks (evaluated by default). ``TRAIN_TASKS`` adds tasks that only the synthetic
training source (``train/data/mix.py``) draws:

- ``multikey_drill``: ``multikey``'s needles for ``max(n_choices, DRILL_KEYS)`` keys, and a question part
  that first answers every key but the asked one, in a random order, one line each, then asks the first
  key in ``multikey``'s wording. Every row so gives as many key -> value lookups as it has keys, each among
  all of them, the last in the eval's wording; copying the latest number never pays. Dense lookup
  supervision of this kind is what associative-recall work (Zoology's MQAR, Arora et al. 2023) finds
  attention models learn key -> value lookup from quickly, where one lookup a document (``multikey``) left
  ``tiny`` copying a number without choosing it by its key (docs/quality.md).

Depth 0 puts the first needle the answer needs at the start of the haystack, 1 at its end (just before
the question). Keys and values have fixed lengths, so every candidate answer of an item has the same
byte length. Each item lists candidates for a log-likelihood choice (the answer first): other numbers
of the same form, or the distractors' values where the task has them (chance: 1 / candidates).

Random streams are separated by domain: eval items draw from ``default_rng([EVAL_DOMAIN, seed, ...])``,
the training source (``train/data/mix.py``) from ``[TRAIN_DOMAIN, ...]``, so no seed setting makes a
training document repeat an eval item; their haystacks differ too (held-out vs corpus files).
"""

from __future__ import annotations

import functools
import math
import string
from dataclasses import dataclass, field

import numpy as np

from train.data.build_corpus import Renderer
from train.data.config import ImageConfig
from train.data.images import decode_image
from train.data.text_stream import TextStream, encode

TASKS = ("passkey", "multikey", "multivalue", "vartrack", "image_needle")  # the eval tasks
TRAIN_TASKS = (*TASKS, "multikey_drill")  # what the synthetic training source draws
DRILL_KEYS = 4  # multikey_drill: keys a document (at least n_choices); 4 fit rows of about 700-900 bytes
EVAL_DOMAIN, TRAIN_DOMAIN = 0x5EA1, 0x7EA1
N_VALUES, N_HOPS = 4, 4  # multivalue: values of the asked key; vartrack: assignments after the first


@dataclass
class Needle:
    """A sentence (and optionally an image after it) placed at ``depth`` of the haystack. ``needed``:
    the answer depends on it (its tokens count for the indexer's needle recall)."""

    depth: float
    text: str
    image: str | None = None  # text rendered into the image
    needed: bool = True


@dataclass
class Draw:
    needles: list[Needle]
    question: str
    answer: str
    candidates: list[str]  # the answer first, then alternatives of the same form


@dataclass
class Item:
    """One task instance: ``tokens [length]`` int32 = prompt (``prompt_len``) then the answer's ids."""

    task: str
    length: int
    depth: float
    tokens: np.ndarray
    prompt_len: int
    answer: str
    candidates: list[str]  # candidates[0] is the answer
    needle_spans: list[tuple[int, int]]  # token ranges [start, end) of the needed needles
    question_len: int  # the prompt's last question_len tokens ask the question
    images: list[tuple[int, np.ndarray, tuple[int, int]]] = field(default_factory=list)  # as Document.images

    @property
    def prompt(self) -> np.ndarray:
        return self.tokens[:self.prompt_len]

    @property
    def answer_ids(self) -> np.ndarray:
        return self.tokens[self.prompt_len:]


def _numbers(rng, digits: int, n: int, exclude=()) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        v = int(rng.integers(10 ** (digits - 1), 10 ** digits))
        if v not in out and v not in exclude:
            out.append(v)
    return out


def _names(rng, n: int, alphabet: str, size: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = "".join(alphabet[i] for i in rng.integers(len(alphabet), size=size))
        if name not in out:
            out.append(name)
    return out


def _later(rng, depth: float, n: int) -> list[float]:
    """``depth`` then ``n`` more depths in [depth, 1], ascending (needles that must appear in order)."""
    return [depth, *sorted(rng.uniform(depth, 1.0, size=n).tolist())]


def draw_passkey(rng, depth: float, n_choices: int) -> Draw:
    key, *others = _numbers(rng, 5, n_choices)
    return Draw([Needle(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")],
                "What is the pass key? The pass key is ", str(key), [str(key), *map(str, others)])


def _magic(key: str, value: int) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def draw_multikey(rng, depth: float, n_choices: int) -> Draw:
    keys = _names(rng, n_choices, string.ascii_lowercase, 8)
    values = _numbers(rng, 7, n_choices)
    needles = [Needle(depth, _magic(keys[0], values[0]))]
    needles += [Needle(float(rng.uniform()), _magic(k, v), needed=False) for k, v in zip(keys[1:], values[1:])]
    return Draw(needles, _multikey_question(keys[0]), str(values[0]), [str(v) for v in values])


def _multikey_answer_phrase(key: str) -> str:
    """What precedes a multikey answer: the eval's question ends in it, and each of the drill's answer lines."""
    return f"The special magic number for {key} mentioned in the provided text is "


def _multikey_question(key: str) -> str:
    return f"What is the special magic number for {key} mentioned in the provided text? " + _multikey_answer_phrase(key)


def draw_multikey_drill(rng, depth: float, n_choices: int) -> Draw:
    """Training only: ``multikey`` with ``max(n_choices, DRILL_KEYS)`` keys whose question part answers
    every key but the first (the asked one), in a random order, before asking the first in ``multikey``'s
    wording; candidates are the values of the first ``n_choices`` keys. Each answer line ends in the phrase
    that precedes the eval's answer, so all of a row's lookups are read the way the eval asks its one."""
    n = max(n_choices, DRILL_KEYS)
    keys = _names(rng, n, string.ascii_lowercase, 8)
    values = _numbers(rng, 7, n)
    needles = [Needle(depth, _magic(keys[0], values[0]))]
    needles += [Needle(float(rng.uniform()), _magic(k, v), needed=False) for k, v in zip(keys[1:], values[1:])]
    lines = "".join(f"{_multikey_answer_phrase(keys[i])}{values[i]}.\n" for i in (1 + rng.permutation(n - 1)).tolist())
    return Draw(needles, lines + _multikey_question(keys[0]), str(values[0]), [str(v) for v in values[:n_choices]])


def draw_multivalue(rng, depth: float, n_choices: int) -> Draw:
    keys = _names(rng, n_choices, string.ascii_lowercase, 8)
    values = _numbers(rng, 7, N_VALUES + n_choices - 1)
    own, foreign = values[:N_VALUES], values[N_VALUES:]
    needles = [Needle(d, _magic(keys[0], v)) for d, v in zip(_later(rng, depth, N_VALUES - 1), own)]
    needles += [Needle(float(rng.uniform()), _magic(k, v), needed=False) for k, v in zip(keys[1:], foreign)]
    question = (f"What are all the special magic numbers for {keys[0]} mentioned in the provided text? "
                f"The special magic numbers for {keys[0]} mentioned in the provided text are ")
    candidates = [", ".join(map(str, own))]
    for j, v in enumerate(foreign):  # one of the key's values swapped for a distractor's
        swapped = list(own)
        swapped[j % N_VALUES] = v
        candidates.append(", ".join(map(str, swapped)))
    return Draw(needles, question, candidates[0], candidates)


def _chain(names: list[str], value: int, depths: list[float], needed: bool) -> list[Needle]:
    texts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return [Needle(d, t, needed=needed) for d, t in zip(depths, texts)]


def draw_vartrack(rng, depth: float, n_choices: int) -> Draw:
    names = _names(rng, 2 * (N_HOPS + 1), string.ascii_uppercase, 5)
    own, other = names[:N_HOPS + 1], names[N_HOPS + 1:]
    value, decoy = _numbers(rng, 5, 2)
    needles = _chain(own, value, _later(rng, depth, N_HOPS), True)
    needles += _chain(other, decoy, sorted(rng.uniform(size=N_HOPS + 1).tolist()), False)
    question = (f"Find all variables that are assigned the value {value} in the text above. Answer: According "
                f"to the chain(s) of variable assignment in the text above, {N_HOPS + 1} variables are assigned "
                f"the value {value}, they are: ")
    candidates = [" ".join(own), " ".join(other)]
    for j in range(n_choices - 2):  # the chain with one variable of the distractor chain in it
        swapped = list(own)
        swapped[j % len(own)] = other[j % len(other)]
        candidates.append(" ".join(swapped))
    return Draw(needles, question, candidates[0], candidates[:n_choices])


def draw_image_needle(rng, depth: float, n_choices: int) -> Draw:
    key, *others = _numbers(rng, 4, n_choices)
    return Draw([Needle(depth, "The secret number is in this image: ", image=str(key))],
                "What is the secret number in the image? The secret number is ", str(key),
                [str(key), *map(str, others)])


DRAWS = {"passkey": draw_passkey, "multikey": draw_multikey, "multivalue": draw_multivalue,
         "vartrack": draw_vartrack, "image_needle": draw_image_needle, "multikey_drill": draw_multikey_drill}


@functools.lru_cache(maxsize=1)
def _renderer() -> Renderer:
    return Renderer(size=24)


def _needle_ids(needle: Needle, tokenizer, image_cfg: ImageConfig):
    """The needle's ids (an image as ``<img>`` + patch placeholders + ``</img>``) and its image, if any:
    ``(index of the first patch in the ids, patches, grid)``."""
    text = encode(tokenizer, "\n" + needle.text)
    if needle.image is None:
        return np.concatenate([text, encode(tokenizer, "\n")]), None
    patches, grid = decode_image(_renderer().render(needle.image, "png"), image_cfg)
    marks = np.full(len(patches) + 2, tokenizer.img_patch, dtype=np.int32)
    marks[0], marks[-1] = tokenizer.img_start, tokenizer.img_end
    return np.concatenate([text, marks, encode(tokenizer, "\n")]), (len(text) + 1, patches, grid)


def make_item(task: str, length: int, depth: float, rng: np.random.Generator, tokenizer, haystack: TextStream,
              image_cfg: ImageConfig, n_choices: int = 4) -> Item:
    """An item of ``task`` of exactly ``length`` tokens with its first needed needle at ``depth``."""
    if task not in DRAWS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TRAIN_TASKS)}")
    if n_choices < 2:
        raise ValueError(f"n_choices={n_choices}: a choice needs at least 2 candidates")
    draw = DRAWS[task](rng, float(depth), n_choices)
    parts = [_needle_ids(n, tokenizer, image_cfg) for n in draw.needles]
    question, answer = encode(tokenizer, "\n" + draw.question), encode(tokenizer, draw.answer)
    n_fill = length - sum(len(ids) for ids, _ in parts) - len(question) - len(answer)
    if n_fill < 0:
        raise ValueError(f"length {length} is too short for task {task}: its needles, question and answer "
                         f"alone take {length - n_fill} tokens")
    filler = haystack.window(int(rng.integers(len(haystack))), n_fill)
    at = [round(n.depth * n_fill) for n in draw.needles]
    pieces, spans, images, cursor, size = [], [], [], 0, 0
    for i in sorted(range(len(at)), key=lambda j: at[j]):  # stable: equal depths keep the draw's order
        ids, image = parts[i]
        pieces += [filler[cursor:at[i]], ids]
        size += at[i] - cursor
        cursor = at[i]
        if draw.needles[i].needed:
            spans.append((size, size + len(ids)))
        if image is not None:
            images.append((size + image[0], image[1], image[2]))
        size += len(ids)
    pieces += [filler[cursor:], question, answer]
    tokens = np.concatenate(pieces).astype(np.int32)
    return Item(task, length, float(depth), tokens, length - len(answer), draw.answer, draw.candidates,
                sorted(spans), len(question), sorted(images, key=lambda im: im[0]))


def eval_item(task: str, length: int, depth_index: int, depth: float, index: int, seed: int, tokenizer,
              haystack: TextStream, image_cfg: ImageConfig, n_choices: int = 4) -> Item:
    """The ``index``-th eval item of (task, length, depth): the same for the same arguments, always."""
    rng = np.random.default_rng([EVAL_DOMAIN, seed, TASKS.index(task), length, depth_index, index])
    return make_item(task, length, depth, rng, tokenizer, haystack, image_cfg, n_choices)


def fixed_tokens(task: str, tokenizer, image_cfg: ImageConfig, n_choices: int = 4) -> int:
    """Tokens an item of ``task`` needs besides the haystack (the byte tokenizer's count is the same for
    every draw: keys and values have fixed lengths)."""
    draw = DRAWS[task](np.random.default_rng(0), 0.5, n_choices)
    needles = sum(len(_needle_ids(n, tokenizer, image_cfg)[0]) for n in draw.needles)
    return needles + len(encode(tokenizer, "\n" + draw.question)) + len(encode(tokenizer, draw.answer))


def normalise(text: str) -> str:
    """A generated answer as compared: up to the first line break, spaces and a final period removed."""
    return text.split("\n", 1)[0].strip().rstrip(".").strip()


def exact_match(item: Item, generated: str) -> bool:
    return normalise(generated) == item.answer


def answer_share(logliks: list[float]) -> float:
    """The answer's (candidate 0's) share of the candidates' summed probability, ``softmax(logliks)[0]``:
    1 for a model sure of the answer, ``1/len(logliks)`` for one indifferent among the candidates. A
    continuous version of ``choice_correct``: it moves while the accuracy still sits at chance."""
    top = max(logliks)
    if top == float("-inf"):
        return 1.0 / len(logliks)
    weights = [math.exp(v - top) for v in logliks]
    return weights[0] / sum(weights)


def choice_correct(logliks: list[float]) -> bool:
    """The answer (candidate 0) has a strictly higher log-likelihood than every alternative: a tie
    counts as wrong, so a model that cannot tell them apart scores no better than chance."""
    return all(logliks[0] > other for other in logliks[1:])


__all__ = ["TASKS", "TRAIN_TASKS", "DRILL_KEYS", "EVAL_DOMAIN", "TRAIN_DOMAIN", "Item", "make_item", "eval_item",
           "fixed_tokens", "normalise", "exact_match", "choice_correct", "answer_share"]
