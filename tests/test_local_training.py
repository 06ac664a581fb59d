"""Local training engines: every engine must give the reference engine's deltas and loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleet.config import ModelConfig
from fleet.learning.engines import BatchedEngine, FusedEngine, LocalSGD, ReferenceEngine, make_engine
from fleet.learning.model import PAD_ID, ModelShape, NWPModel, get_flat


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
    args = (tokens, LocalSGD(2, 5, 0.7))
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
    a, _ = eng.train_device(params, tokens, LocalSGD(1, 4, 0.5), np.random.default_rng(0))
    b, _ = eng.train_device(params, tokens, LocalSGD(1, 4, 0.5), np.random.default_rng(1))
    c, _ = eng.train_device(params, tokens, LocalSGD(1, 4, 0.5), np.random.default_rng(0))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)


def test_all_pad_device_does_not_move():
    shape, params, tokens = _setup("cifg")
    tokens[:, 1:] = PAD_ID
    for eng in (FusedEngine(shape), ReferenceEngine(shape)):
        delta, loss = eng.train_device(params, tokens, LocalSGD(1, 4, 0.5), np.random.default_rng(0))
        assert not np.any(delta) and np.isnan(loss)


def _cohort(shape: ModelShape, sizes: list[int], seed: int = 5) -> list[np.ndarray]:
    """Devices with different example counts and some padded targets."""
    gen = np.random.default_rng(seed)
    out = []
    for n in sizes:
        tokens = gen.integers(4, shape.vocab_total, (n, 7))
        tokens[:, 0] = 1
        tokens[: n // 3, 5:] = PAD_ID
        out.append(tokens)
    return out


def _batched_matches_reference(device: str, cell: str, pad_id: int | None) -> None:
    shape, params, _ = _setup(cell)
    # 1 example (fewer than a batch), 13 (a short last batch), an all-pad device that must not
    # move (riding along beside a real one in its group), 8 (exact batches) and 20 (the most
    # steps: the others ride along masked).
    cohort = _cohort(shape, [1, 13, 6, 8, 20])
    cohort[2][:, 1:] = PAD_ID
    ref = ReferenceEngine(shape, pad_id)
    want = [
        ref.train_device(params, t, LocalSGD(2, 4, 0.7), np.random.default_rng(10 + j))
        for j, t in enumerate(cohort)
    ]
    # Groups of 2: the cohort crosses group boundaries, and results must stay in cohort order.
    engine = BatchedEngine(shape, pad_id, device, group=2)
    jobs = ((t, np.random.default_rng(10 + j)) for j, t in enumerate(cohort))
    got = list(engine.train_devices(params, jobs, LocalSGD(2, 4, 0.7)))
    assert len(got) == len(cohort)
    for j, ((d_want, l_want), (d_got, l_got)) in enumerate(zip(want, got, strict=True)):
        assert d_got.dtype == np.float32 and d_got.shape == params.shape
        if j == 2 and pad_id is not None:
            assert not np.any(d_got) and np.isnan(l_got)
            continue
        assert np.abs(d_want).max() > 1e-2  # it did train
        np.testing.assert_allclose(d_got, d_want, rtol=0, atol=5e-6)
        assert l_got == pytest.approx(l_want, rel=1e-5)


@pytest.mark.parametrize("cell", ["cifg", "lstm"])
@pytest.mark.parametrize("pad_id", [PAD_ID, None])
def test_batched_matches_reference_on_cpu(cell: str, pad_id: int | None):
    _batched_matches_reference("cpu", cell, pad_id)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cell", ["cifg", "lstm"])
def test_batched_matches_reference_on_cuda(cell: str, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # compared to fp32 on CPU
    _batched_matches_reference("cuda", cell, PAD_ID)


def test_a_finished_device_is_not_moved_by_the_rows_it_rides_along_on():
    """With an extreme learning rate a short device's own weights overflow its masked rows'
    logits once it has finished; its update must still be the reference's, not nan."""
    shape, params, _ = _setup("cifg")
    cohort = _cohort(shape, [2, 40])
    lr = 1e22  # one step leaves weights ~1e20: the next forward pass overflows to inf
    want = [
        ReferenceEngine(shape).train_device(params, t, LocalSGD(1, 4, lr), np.random.default_rng(j))
        for j, t in enumerate(cohort)
    ]
    got = list(
        BatchedEngine(shape).train_devices(
            params, ((t, np.random.default_rng(j)) for j, t in enumerate(cohort)), LocalSGD(1, 4, lr)
        )
    )
    assert np.all(np.isfinite(want[0][0])) and np.abs(want[0][0]).max() > 1e19
    np.testing.assert_allclose(got[0][0], want[0][0], rtol=1e-3, atol=1e-3 * np.abs(want[0][0]).max())


def test_token_ids_out_of_range_are_refused_before_training():
    shape, params, tokens = _setup("cifg")
    for bad in (shape.vocab_total, -1):
        tokens[3, 2] = bad
        for engine in (FusedEngine(shape), ReferenceEngine(shape), BatchedEngine(shape)):
            with pytest.raises(ValueError, match="tokens: ids must be in"):
                engine.train_device(params, tokens, LocalSGD(1, 4, 0.5), np.random.default_rng(0))


def test_batched_refuses_mixed_sequence_lengths():
    shape, params, tokens = _setup("cifg")
    jobs = [(tokens, np.random.default_rng(0)), (tokens[:, :5], np.random.default_rng(1))]
    with pytest.raises(ValueError, match="same sequence length"):
        list(BatchedEngine(shape).train_devices(params, jobs, LocalSGD(1, 4, 0.5)))


def test_make_engine():
    mcfg = ModelConfig(vocab_size=36, embed_dim=8, hidden_dim=12, proj_dim=8)
    assert isinstance(make_engine(mcfg), FusedEngine)  # CPU is the default
    assert isinstance(make_engine(mcfg, "reference"), ReferenceEngine)
    assert make_engine(mcfg, "fused").shape.vocab_total == 40
    batched = make_engine(
        ModelConfig(vocab_size=36, embed_dim=8, hidden_dim=12, proj_dim=8, batch_devices=7), "batched"
    )
    assert isinstance(batched, BatchedEngine) and batched.group == 7 and batched.device.type == "cpu"
    with pytest.raises(ValueError, match="model.engine"):
        make_engine(mcfg, "vmap")
    # A shard given a GPU trains on it with the batched engine; without CUDA, "auto" stays on CPU
    # and an explicit cuda device is refused with a message naming the key.
    auto_gpu = make_engine(mcfg, gpus=1.0)
    if torch.cuda.is_available():
        assert isinstance(auto_gpu, BatchedEngine) and auto_gpu.device.type == "cuda"
    else:
        assert isinstance(auto_gpu, FusedEngine)
        with pytest.raises(ValueError, match="model.device"):
            make_engine(ModelConfig(vocab_size=36, embed_dim=8, hidden_dim=12, proj_dim=8, device="cuda"))


@pytest.mark.parametrize("cell", ["cifg", "lstm"])
@pytest.mark.parametrize("pad_id", [PAD_ID, None])
def test_bf16_engines_train_like_the_reference(cell: str, pad_id: int | None):
    """bf16 rounds the GEMMs' operands (8 bits of mantissa), so the update differs from fp32 by a
    rounding, not by what it means: within 2% of the reference's (0.2-0.3% measured), in fp32, and the
    loss within a rounding of the logits. The fp32 modes stay exactly what they were (the other
    tests hold them to 2e-6)."""
    shape, params, tokens = _setup(cell, vocab=300)
    sgd = LocalSGD(2, 5, 0.7)
    d_ref, l_ref = ReferenceEngine(shape, pad_id).train_device(params, tokens, sgd, np.random.default_rng(3))
    engines = [FusedEngine(shape, pad_id, "bf16"), BatchedEngine(shape, pad_id, "cpu", 2, True, "bf16")]
    for eng in engines:
        d, loss = eng.train_device(params, tokens, sgd, np.random.default_rng(3))
        assert d.dtype == np.float32 and d.shape == params.shape, type(eng).__name__
        err = np.linalg.norm(d - d_ref) / np.linalg.norm(d_ref)
        assert 0 < err < 0.02, (type(eng).__name__, err)  # 0: it did run in bf16
        assert loss == pytest.approx(l_ref, rel=1e-3)
    fused = engines[0]
    assert fused.flat.dtype == torch.float32 and fused.flat_lo.dtype == torch.bfloat16  # fp32 master


def test_precision_auto_picks_bf16_only_where_it_gains(monkeypatch):
    """auto: bf16 on hardware with native bf16 for a model whose output layer is large; fp32 for a
    small model (the casts would cost more than they save), on hardware without bf16, and for the
    reference engine, which asked for bf16 is refused by name."""
    from fleet.learning import engines

    small = ModelConfig(vocab_size=36, embed_dim=8, hidden_dim=12, proj_dim=8)
    big = ModelConfig(vocab_size=10_000, embed_dim=96, hidden_dim=16, proj_dim=96)
    for native in (True, False):
        monkeypatch.setattr(engines, "bf16_supported", lambda device, native=native: native)
        assert engines.resolve_precision(big, "cpu", "auto") == ("bf16" if native else "fp32")
        assert engines.resolve_precision(small, "cpu", "fused") == "fp32"
        assert make_engine(big, "fused").precision == ("bf16" if native else "fp32")
    assert make_engine(ModelConfig(**{**small.__dict__, "precision": "bf16"}), "fused").precision == "bf16"
    assert make_engine(ModelConfig(**{**big.__dict__, "precision": "fp32"}), "fused").precision == "fp32"
    assert engines.resolve_precision(big, "cpu", "reference") == "fp32"
    with pytest.raises(ValueError, match="model.precision"):
        make_engine(ModelConfig(**{**small.__dict__, "precision": "bf16"}), "reference")
    with pytest.raises(ValueError, match="model.precision"):
        make_engine(ModelConfig(**{**small.__dict__, "precision": "fp16"}), "fused")
