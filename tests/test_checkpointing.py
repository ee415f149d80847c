"""Activation checkpointing policies: selective checkpointing gives the gradients of no checkpointing and
runs the attention ops (block selection, sparse forward, index KL forward) once per layer and step, where
full checkpointing runs them twice."""

import collections
import importlib

import pytest
import torch

from msa.layer import AttentionConfig
from tests.conftest import KERNEL_HOSTS
from tests.utils import counting, rel_rms
from train.model import Decoder, ModelConfig
from train.parallel import Mesh, ParallelConfig, init_distributed, parallelize
from train.vision import VisionConfig

OPS = [name for _, name in KERNEL_HOSTS]


def _model(impl: str, n_layers: int = 2, n_dense_layers: int = 1, **attention) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=16, rope_dim=8,
                      vision=VisionConfig(kind="linear", patch_size=2))
    # dense layers first, then MSA; 16-key blocks and topk 2, so the 36-token document's last block chooses
    return Decoder(cfg, AttentionConfig(impl=impl, block_size=16, topk=2, index_dim=16,
                                        n_dense_layers=n_dense_layers, **attention))


def _batch(N: int = 48) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (1, N), generator=g)
    cu = torch.tensor([0, 36, 37, N], dtype=torch.int32)
    pos = torch.cat([torch.arange(int(e - s)) for s, e in zip(cu[:-1], cu[1:])])[None]
    labels = torch.roll(ids, -1, 1)
    labels[0, cu[1:] - 1] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu}


def _step(model: Decoder, batch: dict, phase: str, launches=None):
    """Loss, every parameter's gradient and the launches of each of ``OPS`` in one forward and backward."""
    model.zero_grad(set_to_none=True)
    before = dict(launches or {})
    out = model(batch, phase=phase)
    loss = out["lm_sum"] / out["n_tokens"] + 0.5 * out["kl"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ran = {op: (launches or {}).get(op, 0) - before.get(op, 0) for op in OPS}
    return loss.detach(), grads, ran


def _checkpointed(model: Decoder, policy: str, keep_selection: bool = True) -> Decoder:
    if policy == "full":
        import deepspeed

        init_distributed(ParallelConfig())  # DeepSpeed's checkpoint asks the process group for ranks
        deepspeed.checkpointing.configure(None, deepspeed_config={"train_micro_batch_size_per_gpu": 1,
                                                                  "gradient_accumulation_steps": 1})
    return parallelize(model, Mesh(), ParallelConfig(activation_checkpointing=True, checkpoint_policy=policy,
                                                     checkpoint_keep_selection=keep_selection))


def _check_same(ref, out, what):
    (loss, grads, _), (loss_c, grads_c, _) = ref, out
    assert torch.equal(loss, loss_c), what
    assert grads.keys() == grads_c.keys(), what
    index_grads = [n for n in grads if "_idx" in n]
    assert index_grads and all(grads[n].abs().sum() > 0 for n in index_grads)  # the KL reached the indexer
    for name, g in grads.items():
        err = rel_rms(g, grads_c[name])
        assert err < 1e-5, f"{what}, {name}: rel RMS {err:.2e}"


@pytest.mark.usefixtures("restore_dist_env")
def test_selective_keeps_the_kernels_outputs(launches):
    """Triton kernels (interpreted): the gradients of no checkpointing under both policies; the block
    selection, sparse forward and index-KL forward (with its gradients) run once per MSA layer under the
    selective policy, as without checkpointing; full checkpointing runs the sparse forward and the KL twice
    and the block selection once (kept from its first pass), or twice with
    ``parallel.checkpoint_keep_selection=false``."""
    batch = _batch()
    ref = _step(_model("triton"), batch, "sparse", launches)
    assert ref[2] == dict.fromkeys(OPS, 1), ref[2]
    twice = dict.fromkeys(OPS, 2)
    for policy, keep, runs in (("selective", True, dict.fromkeys(OPS, 1)),
                               ("full", True, {**twice, "select_blocks_fwd": 1}), ("full", False, twice)):
        out = _step(_checkpointed(_model("triton"), policy, keep), batch, "sparse", launches)
        _check_same(ref, out, f"{policy}, keep_selection={keep}")
        assert out[2] == runs, (policy, keep, out[2])


@pytest.mark.gpu
@pytest.mark.usefixtures("restore_dist_env")
def test_full_keeps_the_selection_in_host_memory_on_a_gpu(launches, monkeypatch):
    """On CUDA the kept block selection waits in pinned host memory between the passes and comes back
    asynchronously (on the CPU it stays where it is): the gradients of no checkpointing, one selection."""
    import msa.keep

    batch = {k: v.cuda() for k, v in _batch().items()}
    ref = _step(_model("triton").cuda(), batch, "sparse", launches)
    seen = []
    real = msa.keep._Kept.__init__

    def record(self, t, to_host=False):
        real(self, t, to_host)
        seen.append((t.device.type, self.t.device.type, self.t.is_pinned()))

    monkeypatch.setattr(msa.keep._Kept, "__init__", record)
    out = _step(_checkpointed(_model("triton").cuda(), "full"), batch, "sparse", launches)
    _check_same(ref, out, "full on CUDA")
    assert out[2] == {**dict.fromkeys(OPS, 2), "select_blocks_fwd": 1}, out[2]
    assert seen == [("cuda", "cpu", True)], seen  # one MSA layer, its block_idx


def test_selective_builds_the_reverse_index_once_and_reads_no_block_idx_back(monkeypatch):
    """The sparse attention's reverse index (a sort and a device->host read) is kept with its output:
    built once per MSA layer and step under the selective policy, twice under full; the block ids that
    select_blocks made are never read back to be checked."""
    sparse = importlib.import_module("kernels.sparse_attention")  # kernels.sparse_attention is also a function
    calls = collections.Counter()
    monkeypatch.setattr(sparse, "build_csr", counting(calls, "build_csr", sparse.build_csr))
    monkeypatch.setattr(torch, "aminmax", counting(calls, "aminmax", torch.aminmax))
    batch = _batch()
    for policy, runs in (("selective", 1), ("full", 2)):
        calls.clear()
        _step(_checkpointed(_model("triton", n_layers=3), policy), batch, "sparse", collections.Counter())
        assert calls == {"build_csr": 2 * runs}, (policy, calls)  # two MSA layers


@pytest.mark.parametrize("impl,phase", [("reference", "sparse"), ("reference", "warmup"), ("triton", "warmup")])
def test_selective_gives_the_gradients_of_no_checkpointing(impl, phase, launches):
    """The reference (plain torch: everything recomputed) and the warm-up phase (dense attention kept,
    index KL over every visible block)."""
    batch = _batch()
    ref = _step(_model(impl), batch, phase, launches)
    out = _step(_checkpointed(_model(impl), "selective"), batch, phase, launches)
    _check_same(ref, out, f"{impl} {phase}")
    if impl == "triton":  # warm-up: dense attention and the KL on the dense support, once
        assert out[2] == {"select_blocks_fwd": 0, "sparse_attention_fwd": 0, "index_kl_fwd": 1}, out[2]


def test_unknown_checkpoint_policy_names_the_key():
    from tests.utils import compose_train_config
    from train.config import check_parallel

    cfg = compose_train_config(["parallel.checkpoint_policy=some"])
    with pytest.raises(ValueError, match="parallel.checkpoint_policy"):
        check_parallel(cfg, "cpu")
    cfg = compose_train_config(["parallel.checkpoint_keep_selection=false"])  # the default policy: selective
    with pytest.raises(ValueError, match="set checkpoint_policy=full or drop the override"):
        check_parallel(cfg, "cpu")
    check_parallel(compose_train_config(["parallel.checkpoint_keep_selection=false",
                                         "parallel.checkpoint_policy=full"]), "cpu")
    cfg = compose_train_config(["parallel.checkpoint_policy=selective", "parallel.activation_checkpointing=true",
                                "parallel.checkpoint_offload=true"])
    with pytest.raises(ValueError, match="parallel.checkpoint_policy=full"):
        check_parallel(cfg, "cuda")


def test_selective_takes_a_context_parallel_query_chunk():
    """Dense attention of queries that are the last of their keys (a context-parallel rank's chunk: a
    lower-right causal bias, a tensor subclass) inside a selective checkpoint, against no checkpointing."""
    from msa.dense import dense_attention
    from train.parallel.parallelize import selective_checkpointed

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 20, 4, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 48, 2, 16, generator=g, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, 30, 48], dtype=torch.int32)
    ref = torch.autograd.grad(dense_attention(q, k, v, cu).square().sum(), (q, k, v))
    out = torch.autograd.grad(selective_checkpointed(dense_attention, q, k, v, cu).square().sum(), (q, k, v))
    for a, b in zip(ref, out):
        assert rel_rms(a, b) < 1e-6


def test_selective_recompute_may_run_ops_the_forward_did_not():
    """ZeRO-3's parameter hooks run inside a checkpointed block, and what they run depends on the engine's
    state: after DeepSpeed invalidates its trace in a backward (the first step after a frozen stage) the
    recompute frees and gathers parameters that the forward found resident. Such ops run again without
    being looked up in what the forward recorded, and the kept attention output is still reused: SDPA's
    forward runs once, the gradients are those of no checkpointing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from msa.dense import dense_attention
    from train.parallel.parallelize import SAVED_OPS, selective_checkpointed

    released = []

    def block(x):
        if released:  # what ZeRO-3 runs in the recompute only: free_param's torch.empty(0), an all-gather's copy
            torch.empty(0), torch.cat([x.detach(), x.detach()])
        q = x * 2
        return dense_attention(q, x, x).sin()

    class CountAttention(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func.name() in SAVED_OPS
            return func(*args, **(kwargs or {}))

    x = torch.randn(1, 24, 2, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (ref,) = torch.autograd.grad(block(x).square().sum(), x)
    with CountAttention() as counted:
        loss = selective_checkpointed(block, x).square().sum()
        released.append(True)
        (out,) = torch.autograd.grad(loss, x)
    assert counted.calls == 1
    assert rel_rms(ref, out) < 1e-6


def _frozen_step(model: Decoder, batch: dict, phase: str, frozen: bool, calls: collections.Counter):
    """One micro-batch of a stage with frozen main weights, as ``train_step`` builds its loss: the LM loss
    detached, the KL back-propagated. ``frozen``: the main weights take no gradients (``train_main``);
    else they keep them, as before. Returns the gradients and the calls of the MLP and attention cores."""
    model.zero_grad(set_to_none=True)
    model.train_main(not frozen)
    calls.clear()
    out = model(batch, phase=phase)
    (out["lm_sum"].detach() / out["n_tokens"] + 0.5 * out["kl"]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, dict(calls)


@pytest.fixture
def core_calls(monkeypatch):
    """Calls of the MLP and of the attention cores' main attention (dense in the dense layers and in
    warm-up, sparse in the sparse phase; the reference's)."""
    import msa.layer
    import msa.reference
    from train.model import SwiGLU

    calls = collections.Counter()
    monkeypatch.setattr(SwiGLU, "forward", counting(calls, "mlp", SwiGLU.forward))
    monkeypatch.setattr(msa.layer, "dense_attention", counting(calls, "attention", msa.layer.dense_attention))
    monkeypatch.setattr(msa.reference, "sparse_attention",
                        counting(calls, "attention", msa.reference.sparse_attention))
    return calls


@pytest.mark.usefixtures("restore_dist_env")
@pytest.mark.parametrize("policy", ["none", "selective", "full"])
@pytest.mark.parametrize("phase", ["warmup", "sparse"])
def test_frozen_main_runs_forward_only_with_the_same_index_gradients(policy, phase, core_calls):
    """Main weights frozen (``Decoder.train_main(False)``): the index branch's gradients are those of the
    former frozen step (every weight taking gradients, the LM loss detached), no main weight gets a
    gradient, and each block runs its MLP and attention once per micro-batch: the block runner does not
    checkpoint a block whose main path takes no gradient, so nothing is recomputed in backward."""
    batch = _batch()
    n_layers = 3

    def model():
        m = _model("reference", n_layers=n_layers, n_dense_layers=1)
        return m if policy == "none" else _checkpointed(m, policy)

    before, calls_before = _frozen_step(model(), batch, phase, frozen=False, calls=core_calls)
    frozen_model = model()
    grads, calls = _frozen_step(frozen_model, batch, phase, frozen=True, calls=core_calls)
    index = sorted(n for n in before if "_idx" in n)
    assert index and sorted(grads) == index, sorted(grads)  # the index branch's gradients, nothing else
    for name in index:
        assert grads[name].abs().sum() > 0
        err = rel_rms(before[name], grads[name])
        assert err < 1e-6, f"{policy} {phase}, {name}: rel RMS {err:.2e}"
    assert calls == {"mlp": n_layers, "attention": n_layers}, calls
    if policy != "none":  # before: the checkpointed blocks ran again in backward
        assert calls_before["mlp"] > n_layers, calls_before
    frozen_model.train_main(True)  # a later stage: every weight takes gradients again
    assert all(p.requires_grad for p in frozen_model.parameters())
