"""The synthetic retrieval tasks (train/eval/tasks.py): a reader that answers from the prompt alone
scores 100%, random answers score chance, items are reproducible and exactly as long as asked."""

import math
import re

import numpy as np
import pytest

from train.data.config import ImageConfig
from train.data.images import decode_image
from train.data.text_stream import TextStream
from train.data.tokenizer import ByteTokenizer
from train.eval.tasks import (
    DRILL_KEYS,
    TASKS,
    TRAIN_DOMAIN,
    _renderer,
    answer_share,
    choice_correct,
    eval_item,
    exact_match,
    fixed_tokens,
    make_item,
)

TOK = ByteTokenizer()
IMAGE = ImageConfig(max_patches=64)


@pytest.fixture(scope="module")
def heldout():
    return TextStream.stdlib(TOK, 20, heldout=True)


def read_answer(item) -> str:
    """Answer the item's question from its prompt as a careful reader would: find the needles the question
    names, follow them, and (image needle) match the picture against rendered numbers."""
    text = TOK.decode(item.prompt)
    context, question = text[:-item.question_len], text[-item.question_len:]
    if item.task == "passkey":
        (key,) = re.findall(r"The pass key is (\d{5})\. Remember it", context)
        return key
    if item.task in ("multikey", "multivalue"):
        key = re.search(r"special magic numbers? for (\w+) mentioned", question).group(1)
        values = re.findall(rf"special magic numbers for {key} is: (\d+)\.", context)
        return values[0] if item.task == "multikey" else ", ".join(values)
    if item.task == "vartrack":
        value = re.search(r"assigned the value (\d+) in the text", question).group(1)
        held = []
        for name, rhs in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", context):
            if rhs == value or rhs.removeprefix("VAR ") in held:
                held.append(name)
        return " ".join(held)
    if item.task == "image_needle":
        (_, patches, _), = item.images
        for number in (f"{n:04d}" for n in range(1000, 10000)):
            if number in item.candidates:
                drawn, _ = decode_image(_renderer().render(number, "png"), IMAGE)
                if drawn.shape == patches.shape and np.array_equal(drawn, patches):
                    return number
    raise AssertionError(f"cannot answer {item.task}")


def items(heldout, seed=0, lengths=(700, 1500), depths=(0.0, 0.5, 1.0), n=3):
    return [eval_item(task, L, di, d, i, seed, TOK, heldout, IMAGE)
            for task in TASKS for L in lengths for di, d in enumerate(depths) for i in range(n)]


def test_a_reader_of_the_prompt_scores_every_item(heldout):
    for item in items(heldout):
        answer = read_answer(item)
        assert exact_match(item, answer + ".\nmore text"), (item.task, answer, item.answer)
        logliks = [0.0 if c == answer else -1.0 for c in item.candidates]
        assert choice_correct(logliks), (item.task, answer, item.candidates)
        sure = [0.0 if c == answer else float("-inf") for c in item.candidates]
        assert answer_share(sure) == 1.0, (item.task, answer, item.candidates)


def test_random_answers_score_chance(heldout):
    rng = np.random.default_rng(1)
    pool = items(heldout, seed=5, lengths=(1500,), depths=(0.2, 0.8), n=15)
    choice = np.mean([choice_correct(rng.normal(size=len(it.candidates)).tolist()) for it in pool])
    chance, n = 1 / len(pool[0].candidates), len(pool)
    assert abs(choice - chance) < 4 * (chance * (1 - chance) / n) ** 0.5, (choice, chance)
    guesses = ["".join(rng.choice(list("0123456789 ,"), size=len(it.answer))) for it in pool]
    assert np.mean([exact_match(it, g) for it, g in zip(pool, guesses)]) == 0.0
    assert not choice_correct([0.0, 0.0, -1.0, -1.0]), "a tie with the answer is not a correct choice"
    shares = [answer_share(rng.normal(size=len(it.candidates)).tolist()) for it in pool]
    assert abs(np.mean(shares) - chance) < 4 * np.std(shares) / n**0.5, (np.mean(shares), chance)


def test_answer_share_by_hand():
    """The answer's share of the candidates' probability: softmax of the summed log-likelihoods, candidate 0."""
    assert answer_share([math.log(0.5), math.log(0.25), math.log(0.25)]) == pytest.approx(0.5)
    assert answer_share([math.log(0.1), math.log(0.3)]) == pytest.approx(0.25)  # 0.1 / (0.1 + 0.3)
    assert answer_share([-2.0] * 4) == pytest.approx(0.25)  # indifferent: chance
    assert answer_share([-1000.0, -1000.0 - math.log(3)]) == pytest.approx(0.75)  # no underflow
    assert answer_share([float("-inf")] * 4) == 0.25  # nothing has probability: no NaN
    assert answer_share([float("-inf"), 0.0]) == 0.0


def test_items_are_reproducible_and_seeds_differ(heldout):
    a, b, c = items(heldout, seed=3, n=1), items(heldout, seed=3, n=1), items(heldout, seed=4, n=1)
    assert all(np.array_equal(x.tokens, y.tokens) and x.answer == y.answer for x, y in zip(a, b))
    assert sum(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, c)) == 0
    # the training source's stream for the same numbers is another one (train/data/mix.py)
    train = make_item("passkey", 700, 0.0, np.random.default_rng([TRAIN_DOMAIN, 3, 0, 700, 0, 0]), TOK, heldout,
                      IMAGE)
    assert train.answer != eval_item("passkey", 700, 0, 0.0, 0, 3, TOK, heldout, IMAGE).answer


@pytest.mark.parametrize("task", TASKS)
def test_items_fit_exactly_and_needles_sit_at_their_depth(heldout, task):
    need = fixed_tokens(task, TOK, IMAGE)
    for length in (need, need + 1, 1000, 4097):
        for di, depth in enumerate((0.0, 0.5, 1.0)):
            item = eval_item(task, length, di, depth, 0, 0, TOK, heldout, IMAGE)
            assert len(item.tokens) == length and item.prompt_len == length - len(TOK.encode(item.answer))
            assert TOK.decode(item.answer_ids) == item.answer
            first = item.needle_spans[0][0]
            filler = length - need
            assert abs(first - round(depth * filler)) <= need, (task, length, depth, first)
            assert item.needle_spans[-1][1] <= item.prompt_len - item.question_len
            for start, _, _ in item.images:
                assert item.tokens[start - 1] == TOK.img_start
    with pytest.raises(ValueError, match="too short"):
        eval_item(task, need - 1, 0, 0.5, 0, 0, TOK, heldout, IMAGE)


def drill(heldout, length, seed, n_choices=4, depth=0.5):
    return make_item("multikey_drill", length, depth, np.random.default_rng([TRAIN_DOMAIN, seed]), TOK, heldout,
                     IMAGE, n_choices)


@pytest.mark.parametrize("n_choices", [2, 4, 6])
def test_multikey_drill_answers_every_other_key_then_asks_the_first(heldout, n_choices):
    """``multikey_drill`` (training only): exactly as long as asked, the same for the same rng seed; its
    question part answers each key but the asked one with that key's own value, once, then asks the asked
    key in multikey's wording; the answer is the asked key's value, the candidates (answer first) the
    values of the first n_choices keys, all of one byte length."""
    need = fixed_tokens("multikey_drill", TOK, IMAGE, n_choices)
    n_keys = max(n_choices, DRILL_KEYS)
    for seed in range(6):
        for length in (need, need + 1, need + 150):
            item = drill(heldout, length, seed, n_choices)
            again = drill(heldout, length, seed, n_choices)
            assert len(item.tokens) == length and np.array_equal(item.tokens, again.tokens)
            assert TOK.decode(item.answer_ids) == item.answer == item.candidates[0]
            assert len(item.candidates) == n_choices and len(set(item.candidates)) == n_choices
            assert len({len(c) for c in item.candidates}) == 1
            text = TOK.decode(item.prompt)
            context, question = text[:-item.question_len], text[-item.question_len:]
            needles = dict(re.findall(r"One of the special magic numbers for (\w+) is: (\d{7})\.", context))
            assert len(needles) == n_keys and set(item.candidates) <= set(needles.values())
            lines = re.findall(r"The special magic number for (\w+) mentioned in the provided text is (\d{7})\.\n",
                               question)
            asked = re.fullmatch(r"\n(?:.*\n)*What is the special magic number for (\w+) mentioned in the provided "
                                 r"text\? The special magic number for \1 mentioned in the provided text is ",
                                 question).group(1)
            assert needles[asked] == item.answer
            assert len(lines) == n_keys - 1 and {k for k, _ in lines} == set(needles) - {asked}
            assert all(needles[k] == v for k, v in lines)
            assert item.question_len == len(TOK.encode(question))
    if n_choices >= DRILL_KEYS:  # every key's value is a candidate, in the draw's order of keys
        orders = set()
        for seed in range(6):
            item = drill(heldout, need, seed, n_choices)
            values = re.findall(r"provided text is (\d{7})\.\n", TOK.decode(item.prompt))
            orders.add(tuple(item.candidates.index(v) for v in values))
        assert len(orders) > 1, "the answer lines are in a random order of the keys"
    with pytest.raises(ValueError, match="too short"):
        drill(heldout, need - 1, 0, n_choices)
