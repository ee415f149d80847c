"""Shared test setup.

Without CUDA, Triton kernels run in the interpreter (TRITON_INTERPRET=1), which must be set before
triton is first imported; this file is loaded before any test module imports it.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # slow cases run when asked for by marker (pytest -m slow), as pyproject.toml's marker says
    skip_slow = pytest.mark.skip(reason="slow: covered by a faster test; run with -m slow")
    asked = "slow" in (config.getoption("-m") or "")
    # the kernel modules' CPU cases (and other tests marked `interpreter`) call the Triton kernels on CPU
    # tensors, which only the interpreter
    # runs; a CUDA machine compiles the kernels instead (TRITON_INTERPRET is read at import), so there the
    # gpu cases, on CUDA tensors, are the kernel tests
    skip_interp = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (a CPU-only machine); "
                                          "the gpu cases test the kernels here")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if (HAS_CUDA and not interpreted and "gpu" not in item.keywords
                and (item.path.name.startswith("test_kernel_") or "interpreter" in item.keywords)):
            item.add_marker(skip_interp)
        if "slow" in item.keywords and not asked:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield



@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """The embedded default corpus, built once per test session (about 15 s on 2 cores)."""
    from train.data.build_corpus import ensure_corpus
    from train.data.config import CorpusConfig

    path = tmp_path_factory.mktemp("corpus") / "default"
    ensure_corpus(str(path), CorpusConfig())
    return path


@pytest.fixture
def restore_dist_env():
    """In-process training sets RANK/MASTER_PORT...; put them back so later subprocesses do not
    inherit this process's rendezvous."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# the host functions behind kernels/ops.py's ops: what the ``launches`` fixture counts
KERNEL_HOSTS = (("kernels.index_topk", "select_blocks_fwd"), ("kernels.sparse_attention", "sparse_attention_fwd"),
                ("kernels.index_kl", "index_kl_fwd"))


@pytest.fixture
def launches(monkeypatch):
    """Counts of the kernels' forward host functions (``KERNEL_HOSTS``), called through their ops."""
    import collections
    import importlib

    from tests.utils import counting

    counts = collections.Counter()
    for module_name, name in KERNEL_HOSTS:
        module = importlib.import_module(module_name)  # kernels.sparse_attention is also a function's name
        monkeypatch.setattr(module, name, counting(counts, name, getattr(module, name)))
    return counts
