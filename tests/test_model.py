"""The NWP model: CIFG coupling, sizes, the flat vector round trip, FLOP and byte counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleet.config import ModelConfig
from fleet.learning.model import (
    SPECIAL_TOKENS,
    ModelShape,
    NWPModel,
    build_model,
    flops_per_example,
    get_flat,
    job_flops,
    model_bytes,
    param_count,
    set_flat,
)

GBOARD = ModelConfig(
    name="cifg_gboard", cell="cifg", vocab_size=10000, embed_dim=96, hidden_dim=670, proj_dim=96
)


def test_cifg_gates_are_coupled():
    torch.manual_seed(0)
    m = NWPModel(30, 6, 10, 6, cell="cifg")
    gx = torch.randn(4, 30)
    _, _, gates = m.cell(gx, torch.randn(4, 6), torch.randn(4, 10))
    torch.testing.assert_close(gates.f, 1.0 - gates.i, rtol=0, atol=0)
    # Three gate blocks, not four: the forget gate has no weights of its own.
    assert m.w_x.shape == (6, 3 * 10)
    lstm = NWPModel(30, 6, 10, 6, cell="lstm")
    _, _, lg = lstm.cell(torch.randn(4, 40), torch.randn(4, 6), torch.randn(4, 10))
    assert not torch.allclose(lg.f, 1.0 - lg.i)


def test_gboard_size_is_about_1_4m_params():
    m = build_model(GBOARD)
    n = param_count(m)
    assert m.embedding.shape == (10000 + SPECIAL_TOKENS, 96)
    assert 1.35e6 < n < 1.45e6, n
    assert n == ModelShape.from_config(GBOARD).num_params()
    assert model_bytes(GBOARD) == 4 * n


def test_w1_lstm_is_about_1_54m_params():
    assert round(ModelShape(10000, 96, 670, 96, "lstm").num_params() / 1e4) == 154


def test_flops_match_the_w1_figure():
    # W1 (vocab 10000 total, LSTM): 11.82 GFLOP per update of 64 sequences of 20 tokens.
    cfg = ModelConfig(
        cell="lstm", vocab_size=10000 - SPECIAL_TOKENS, embed_dim=96, hidden_dim=670, proj_dim=96
    )
    assert job_flops(cfg, np.array([64]), 1)[0] / 1e9 == pytest.approx(11.82, abs=0.005)
    assert job_flops(cfg, np.array([10, 20]), 3).tolist() == [
        30 * flops_per_example(cfg),
        60 * flops_per_example(cfg),
    ]


def test_flat_round_trip_and_forward_shape():
    m = NWPModel(20, 4, 6, 4, cell="lstm")
    flat = np.arange(param_count(m), dtype=np.float32) / 1000.0
    set_flat(m, flat)
    np.testing.assert_array_equal(get_flat(m), flat)
    # Flat order is embedding first, as ModelShape.param_shapes says.
    np.testing.assert_array_equal(m.embedding.detach().numpy().ravel(), flat[: 20 * 4])
    assert m(torch.zeros(3, 5, dtype=torch.int64)).shape == (3, 5, 20)
    with pytest.raises(ValueError, match="expected"):
        set_flat(m, flat[:-1])


def test_untied_projection_is_refused():
    with pytest.raises(ValueError, match="proj_dim"):
        NWPModel(20, 8, 6, 4)
