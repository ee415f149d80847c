"""kernels/common.py's bookkeeping against plain torch."""

import pytest
import torch

from kernels.common import build_layout, check_block_idx, check_cu_seqlens, mark_valid_block_idx


def test_a_checked_cu_seqlens_is_checked_again_once_written_to():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    check_cu_seqlens(cu, 1, 8)
    check_cu_seqlens(cu, 1, 8)  # remembered: no device read
    cu[1] = 9  # in place: the version counter moves, so the next check reads it again
    with pytest.raises(ValueError, match="must rise from 0 to N=8"):
        check_cu_seqlens(cu, 1, 8)
    with pytest.raises(ValueError, match="must rise from 0 to N=9"):  # another N: checked anew
        check_cu_seqlens(torch.tensor([0, 3, 8], dtype=torch.int32), 1, 9)


def test_block_idx_that_select_blocks_made_is_not_read_back_until_written_to():
    block_idx = torch.tensor([[[[0, -1], [1, 0]]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"in \[-1, 1\), got -1..1"):
        check_block_idx(block_idx, 1)
    mark_valid_block_idx(block_idx, 2)
    check_block_idx(block_idx, 2)
    block_idx[0, 0, 0, 0] = 5  # in place: the version moves, so it is read again
    with pytest.raises(ValueError, match=r"in \[-1, 2\), got -1..5"):
        check_block_idx(block_idx, 2)
    mark_valid_block_idx(block_idx, 9)  # marked for 9 blocks: a check for 2 still reads it
    with pytest.raises(ValueError, match="got -1..5"):
        check_block_idx(block_idx, 2)


def test_the_layout_is_built_once_per_cu_seqlens_and_shape():
    cu = torch.tensor([0, 5, 40, 64], dtype=torch.int32)
    first = build_layout(64, 16, cu, "cpu")
    assert build_layout(64, 16, cu, "cpu") is first  # the layers of a step share it
    assert build_layout(64, 32, cu, "cpu") is not first  # another block size
    fresh = build_layout(64, 16, cu.clone(), "cpu")
    for f in ("tok_start", "tok_vb", "vb_start", "vb_end"):
        assert torch.equal(getattr(first, f), getattr(fresh, f))
    cu[1] = 9  # written to: built again, from the new values
    rebuilt = build_layout(64, 16, cu, "cpu")
    assert rebuilt is not first and rebuilt.tok_start[8:10].tolist() == [0, 9]


def test_the_one_document_layout_is_built_once_per_shape_and_equals_one_packed_document():
    """Rows without ``cu_seqlens`` share one layout per (length, block size, device) across layers and steps
    (it was built again by every layer's forward and recompute); it equals a one-document ``cu_seqlens``'s."""
    one = build_layout(70, 16, None, "cpu")
    assert build_layout(70, 16, None, "cpu") is one
    assert build_layout(70, 32, None, "cpu") is not one and build_layout(71, 16, None, "cpu") is not one
    packed = build_layout(70, 16, torch.tensor([0, 70], dtype=torch.int32), "cpu")
    for f in ("tok_start", "tok_vb", "vb_start", "vb_end"):
        assert torch.equal(getattr(one, f), getattr(packed, f).to(getattr(one, f).dtype)), f
    assert one.n_blocks == packed.n_blocks == 5
    for n in range(100, 110):  # a bounded cache: old shapes make room
        build_layout(n, 16, None, "cpu")
    assert build_layout(70, 16, None, "cpu") is not one


def test_host_reads_of_an_msa_layer():
    """Device->host reads stall the launch queue. Per MSA layer the selection, attention and KL read one
    value (the attention's grid sizes; the block ids that select_blocks made are not read back to be
    checked); checking ``cu_seqlens``, building its layout and finding its longest document (whether the
    row takes the dense path) share one read of it per step, in the first layer only (none where the training
    loop remembered the host batch's bounds)."""
    from torch.overrides import TorchFunctionMode

    from msa.layer import AttentionConfig, MSAAttention
    from msa.rope import Rotary

    class HostReads(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("__bool__", "__int__", "__float__", "item", "tolist"):
                HostReads.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    cfg = AttentionConfig(block_size=16, topk=2, index_dim=16, impl="triton")
    layers = [MSAAttention(32, 2, 1, 16, 16, cfg) for _ in range(3)]
    cu = torch.tensor([0, 40, 100, 128], dtype=torch.int32)
    pos = torch.cat([torch.arange(40), torch.arange(60), torch.arange(28)])[None]
    x, rot = torch.randn(1, 128, 32), Rotary(pos, 10000.0)
    reads = []
    for layer in layers:
        HostReads.n = 0
        with HostReads():
            layer(x, rot, cu)
        reads.append(HostReads.n)
    assert reads == [2, 1, 1], reads  # was 13 per layer (three checks of cu_seqlens, three layouts), then 4, 2, 2,
    # then 4, 1, 1 (the check, the layout's block count and the longest document each read cu_seqlens)


def test_a_packed_step_reads_its_document_bounds_once(monkeypatch):
    """The check, the layout (its virtual blocks counted on the host) and the dense layers' document lengths share
    one device-to-host read of ``cu_seqlens`` (``msa.host.host_bounds``); an empty document and one shorter than a
    block get the virtual blocks a hand count gives."""
    import msa.host
    from msa.dense import document_lengths, longest_document

    reads = []
    monkeypatch.setattr(msa.host, "_read_bounds", lambda cu: reads.append(1) or cu.tolist())
    cu = torch.tensor([0, 5, 5, 40, 64], dtype=torch.int32)  # documents of 5, 0, 35 and 24 tokens
    check_cu_seqlens(cu, 1, 64)
    layout = build_layout(64, 16, cu, "cpu")
    assert layout.vb_start.tolist() == [0, 5, 21, 37, 40, 56]  # 1 + 0 + 3 + 2 blocks of at most 16 keys
    assert layout.vb_end.tolist() == [5, 21, 37, 40, 56, 64]
    assert longest_document(cu, 64) == 35
    assert document_lengths(cu, 64, 30) == ([0, 0, 6, 24], [5, 0, 35, 24])  # the last 30 queries
    assert len(reads) == 1


def test_sharded_rows_without_cu_seqlens_get_bounds_the_host_knows(monkeypatch):
    """Under sequence or context sharding ``shard_batch`` makes each unpacked row a document of a new
    ``cu_seqlens``; it records the values it built, so the layers' check, layout and longest document read none
    back from the device."""
    import msa.host
    from msa.dense import longest_document
    from train.parallel.mesh import Mesh
    from train.parallel.shard import shard_batch

    reads = []
    monkeypatch.setattr(msa.host, "_read_bounds", lambda cu: reads.append(1) or cu.tolist())
    ids = torch.arange(2 * 32).reshape(2, 32)
    out = shard_batch({"input_ids": ids, "labels": ids, "position_ids": torch.arange(32).repeat(2, 1)},
                      Mesh(sp_size=2))
    cu = out["cu_seqlens"]
    assert cu.tolist() == [0, 32, 64]
    check_cu_seqlens(cu, 1, 64)
    build_layout(64, 16, cu, "cpu")
    assert longest_document(cu, 64) == 32
    assert reads == []


@pytest.mark.usefixtures("restore_dist_env")
def test_a_training_step_takes_the_document_bounds_from_the_host_batch(monkeypatch):
    """``train_step`` hands the layers the host batch's ``cu_seqlens`` values (``remember_bounds``), so a packed
    step (a dense first layer per document, then MSA, forward and backward) reads none back from the device;
    without that, the same step reads them."""
    import itertools

    import msa.host
    from tests.utils import compose_train_config
    from train import loop
    from train.parallel import init_distributed
    from train.recipe import build_recipe

    reads = []
    monkeypatch.setattr(msa.host, "_read_bounds", lambda cu: reads.append(1) or cu.tolist())
    cfg = compose_train_config(["model=tiny", "model.n_layers=2", "attention.impl=reference", "attention.block_size=16",
                                "attention.topk=2", "data.seq_len=96", "logging.wandb.mode=disabled"])
    ids = torch.randint(0, cfg.model.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "cu_seqlens": torch.tensor([0, 70, 96]).int(),
             "position_ids": torch.cat([torch.arange(70), torch.arange(26)])[None]}
    stage = build_recipe(cfg)[-1]
    run = loop.start(cfg, init_distributed(cfg.parallel), [stage], stage, None, batches=itertools.repeat(batch))
    assert stage.phase == "sparse" and not loop.train_step(run)["bad"]
    assert reads == []
    monkeypatch.setattr(loop, "remember_bounds", lambda cu, bounds: cu)
    batch["cu_seqlens"] = batch["cu_seqlens"].clone()  # a tensor nothing has read yet
    loop.train_step(run)
    assert len(reads) == 1
