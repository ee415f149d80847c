"""parallel.compile_blocks: each block compiled around its eager attention core gives the loss and the
gradients of the plain model (fp32, rel RMS < 1e-5; inductor reorders reductions), with and without
checkpointing. aot_eager (tracing and the graph split, no code generation) runs by default; inductor,
which compiles C++ on a CPU (about 30 s here), is the slow case."""

import pytest

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
