"""parallel.compile_blocks: each block compiled around its eager attention core gives the loss and the
gradients of the plain model (fp32, rel RMS < 1e-5; inductor reorders reductions), with and without
checkpointing. aot_eager (tracing and the graph split, no code generation) runs by default; inductor,
which compiles C++ on a CPU (about 30 s here), is the slow case."""

import numpy as np
import pytest
import torch

from tests.test_checkpointing import _batch, _check_same, _checkpointed, _model, _step
from train.parallel.parallelize import EagerCore, compile_block


def _compare(backend: str, policies: tuple[str, ...], n_layers: int):
    batch = _batch()
    for policy in policies:
        ref = _step(_model("reference", n_layers, n_dense_layers=n_layers - 1), batch, "sparse")
        model = _model("reference", n_layers, n_dense_layers=n_layers - 1)
        if policy != "none":
            model = _checkpointed(model, policy)
        for block in model.blocks():
            compile_block(block, backend)
            assert isinstance(block.attn.core, EagerCore)
        _check_same(ref, _step(model, batch, "sparse"), f"{backend} {policy}")
        _check_same(ref, _step(model, batch, "sparse"), f"{backend} {policy}, second step")


def test_compiled_blocks_give_the_plain_gradients():
    """One MSA block under selective checkpointing: the compiled forward, its recompute and the backward."""
    _compare("aot_eager", ("selective",), n_layers=1)


@pytest.mark.slow
@pytest.mark.usefixtures("restore_dist_env")
def test_inductor_blocks_give_the_plain_gradients():
    _compare("inductor", ("none", "selective", "full"), n_layers=2)


def test_evals_and_generation_run_on_a_compiled_model():
    """Evals during training and generation call each layer's own core outside the compiled block: through
    ``EagerCore`` they give the plain model's completions and retrieval scores (its needle recall included)."""
    from tests.test_eval_metrics import TOK, tiny
    from train.data.text_stream import TextStream
    from train.eval.config import EvalSpec
    from train.eval.runner import retrieval
    from train.generate import Prompt, generate

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(tiny())
    plain, compiled = models
    for block in compiled.blocks():
        compile_block(block, "aot_eager")
    stream = TextStream(np.frombuffer(b"def f(x):\n    return x * 2  # twice\n" * 40, dtype=np.uint8), "t")
    spec = EvalSpec(tasks=["passkey"], depths=[0.0, 1.0], items=2)
    got, want = (retrieval(m, TOK, spec, "passkey", 256, stream, "sparse", None) for m in (compiled, plain))
    assert want["needle_recall"]["layers"], want  # 16 blocks of 16 with top-2: MSA really selects
    for key in ("choice", "share", "nll", "needle", "needle_hit"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["needle_recall"]["layers"] == pytest.approx(want["needle_recall"]["layers"], rel=1e-5)
    prompts = [Prompt(np.frombuffer(b"x = 1\ny = 2\n" * 8, dtype=np.uint8).astype(np.int32), [])]
    got, want = (generate(m, prompts, 6, phase="sparse")[0].ids for m in (compiled, plain))
    assert got == want
