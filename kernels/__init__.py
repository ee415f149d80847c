"""Triton kernels for MSA, with the signatures of ``msa.reference`` (the contract is in ``msa/reference.py``)."""

import os


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar tensor into an index with ``int(ndarray)``, which numpy
    >= 2.4 rejects for its 1-element arrays ("only 0-dimensional arrays can be converted"), so a loop
    bound loaded from memory (``range(0, n)``) fails under ``TRITON_INTERPRET=1``. Seen with triton
    3.6.0 + numpy 2.4.6; compiled kernels are unaffected."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_msa_fixed", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._msa_fixed = True
    interpreter._patch_lang_tensor = patched


_fix_interpreter_scalar_index()

from kernels.index_kl import index_kl_loss  # noqa: E402
from kernels.index_topk import select_blocks  # noqa: E402
from kernels.sparse_attention import deferred_kl_fits, sparse_attention, sparse_attention_kl  # noqa: E402

__all__ = ["select_blocks", "sparse_attention", "index_kl_loss", "sparse_attention_kl", "deferred_kl_fits"]
