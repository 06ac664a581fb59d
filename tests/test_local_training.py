"""Local training engines: the fused engine must give the reference engine's deltas and loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleet.config import ModelConfig
from fleet.local_training import FusedEngine, ReferenceEngine, make_engine
from fleet.model import PAD_ID, ModelShape, NWPModel, get_flat


def _setup(cell: str, vocab: int = 40) -> tuple[ModelShape, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    shape = ModelShape(vocab, 8, 12, 8, cell)
    params = get_flat(NWPModel(vocab, 8, 12, 8, cell, init_scale=0.3))
    tokens = np.random.default_rng(1).integers(4, vocab, (13, 7))
    tokens[:, 0] = 1  # bos
    tokens[2:5, 4:] = PAD_ID  # short sentences, padded
    return shape, params, tokens


@pytest.mark.parametrize("cell", ["cifg", "lstm"])
@pytest.mark.parametrize("pad_id", [PAD_ID, None])
def test_fused_matches_reference(cell: str, pad_id: int | None):
    shape, params, tokens = _setup(cell)
    # 13 examples in batches of 5: a short last batch; 2 epochs: state carried across epochs.
    args = (tokens, 2, 5, 0.7)
    d_ref, l_ref = ReferenceEngine(shape, pad_id).train_device(params, *args, np.random.default_rng(3))
    fused = FusedEngine(shape, pad_id)
    d_fu, l_fu = fused.train_device(params, *args, np.random.default_rng(3))
    assert d_fu.dtype == np.float32 and d_fu.shape == params.shape
    assert np.abs(d_ref).max() > 1e-2  # it did train
    np.testing.assert_allclose(d_fu, d_ref, rtol=0, atol=2e-6)
    assert l_fu == pytest.approx(l_ref, rel=1e-5)
    # Buffers are reused: a second device through the same engine gives the same answer.
    d_again, _ = fused.train_device(params, *args, np.random.default_rng(3))
    np.testing.assert_array_equal(d_again, d_fu)


def test_batch_order_comes_from_the_rng():
    shape, params, tokens = _setup("cifg")
    eng = FusedEngine(shape)
    a, _ = eng.train_device(params, tokens, 1, 4, 0.5, np.random.default_rng(0))
    b, _ = eng.train_device(params, tokens, 1, 4, 0.5, np.random.default_rng(1))
    c, _ = eng.train_device(params, tokens, 1, 4, 0.5, np.random.default_rng(0))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)


def test_all_pad_device_does_not_move():
    shape, params, tokens = _setup("cifg")
    tokens[:, 1:] = PAD_ID
    for eng in (FusedEngine(shape), ReferenceEngine(shape)):
        delta, loss = eng.train_device(params, tokens, 1, 4, 0.5, np.random.default_rng(0))
        assert not np.any(delta) and np.isnan(loss)


def test_make_engine():
    mcfg = ModelConfig(vocab_size=36, embed_dim=8, hidden_dim=12, proj_dim=8)
    assert isinstance(make_engine(mcfg), FusedEngine)
    assert isinstance(make_engine(mcfg, "reference"), ReferenceEngine)
    assert make_engine(mcfg, "fused").shape.vocab_total == 40
    with pytest.raises(ValueError, match="model.engine"):
        make_engine(mcfg, "vmap")
