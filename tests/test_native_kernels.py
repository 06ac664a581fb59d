"""The fused engine's native bf16 kernels (kernels.c): each kernel against PyTorch's own formula,
the engine against the reference, the build (cache, concurrent builds, no compiler) and the
process's floating-point environment left as it was."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fleet.config import ConfigError, ModelConfig
from fleet.learning.engines import (
    FusedEngine,
    LocalSGD,
    NativeFusedEngine,
    ReferenceEngine,
    make_engine,
    native,
)
from fleet.learning.model import PAD_ID, ModelShape, NWPModel, get_flat
from fleet.round.shard import _engine_name

ROUNDING = 2.0**-8  # one rounding to bf16 (8 significant bits) moves a value by at most this share


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    lib = native.load()
    if lib is None:
        pytest.skip(f"no native kernels on this machine: {native.why_not()}")
    return lib


def _p(t: torch.Tensor) -> int:
    return t.data_ptr()


@pytest.mark.parametrize("gates", [3, 4])
@pytest.mark.parametrize("first_step", [False, True])
def test_cell_kernels_match_autograd(lib, gates: int, first_step: bool):
    """One timestep forward and backward against the same cell written in PyTorch and
    differentiated by autograd, in float64: the kernels' only approximation is their exp. The
    first step has no recurrent input (zr is NULL)."""
    b, hd = 5, 37  # odd sizes: no vector width divides them
    g = torch.Generator().manual_seed(gates)
    zlo = (torch.randn(b, gates * hd, generator=g) * 3).to(torch.bfloat16)
    bias, zr = torch.randn(gates * hd, generator=g), torch.randn(b, gates * hd, generator=g)
    if first_step:
        zr.zero_()
    c0, dh, dc_next = (torch.randn(b, hd, generator=g) for _ in range(3))

    pre = (zlo.double() + bias.double() + zr.double()).requires_grad_()
    c_prev = c0.double().requires_grad_()
    o, i = pre[:, :hd].sigmoid(), pre[:, hd : 2 * hd].sigmoid()
    gg = pre[:, -hd:].tanh()
    c = c_prev + i * (gg - c_prev) if gates == 3 else pre[:, 2 * hd : 3 * hd].sigmoid() * c_prev + i * gg
    h = o * c.tanh()
    (h * dh.double()).sum().add((c * dc_next.double()).sum()).backward()

    z, c1, tc, hh = (torch.empty(b, n) for n in (gates * hd, hd, hd, hd))
    rec = None if first_step else _p(zr)
    lib.cell_forward(b, hd, gates, _p(zlo), _p(bias), rec, _p(z), _p(c0), _p(c1), _p(tc), _p(hh))
    assert torch.allclose(hh.double(), h, atol=2e-5) and torch.allclose(c1.double(), c, atol=2e-5)
    m, mlo = torch.empty(b, gates * hd), torch.empty(b, gates * hd, dtype=torch.bfloat16)
    gbias, dc = torch.zeros(gates * hd), dc_next.clone()
    lib.cell_backward(b, hd, gates, _p(dh), _p(z), _p(c0), _p(tc), _p(dc), _p(m), _p(mlo), _p(gbias))
    assert torch.allclose(m.double(), pre.grad, atol=5e-5)  # the gate gradients
    assert torch.allclose(dc.double(), c_prev.grad, atol=5e-5)  # what carries to step s - 1
    assert torch.equal(mlo, m.to(torch.bfloat16))  # rounded once, to nearest even
    assert torch.allclose(gbias, m.sum(0), atol=1e-5)


@pytest.mark.parametrize("n", [7, 320, 333])  # one partial chunk, one full, one full + partial
def test_softmax_xent_down_the_columns(lib, n: int):
    """Column k of the (vocabulary x tokens) logits becomes p - onehot(target) rounded once to
    bf16, a pad target's column becomes zero, and the loss is the sum over counted columns."""
    v = 1003
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(v, n, generator=g) * 4).to(torch.bfloat16)
    x[500] += 30  # a late large logit in every column: the running max must rescale its sum
    target = torch.randint(0, v, (n,), generator=g)
    target[1::5] = PAD_ID
    keep = target != PAD_ID
    p = torch.softmax(x.double(), 0)
    want = p.clone()
    want[target[keep], torch.arange(n)[keep]] -= 1
    want[:, ~keep] = 0
    loss = -p[target[keep], torch.arange(n)[keep]].log().sum()

    got_loss = lib.softmax_xent_cols(v, n, _p(x), _p(target), PAD_ID)
    assert got_loss == pytest.approx(float(loss), rel=1e-5)
    err = (x.double() - want).abs()
    assert bool((err <= want.abs() * (ROUNDING + 1e-4) + 1e-6).all())  # one bf16 rounding
    assert bool((x[:, ~keep] == 0).all())


def test_updates_write_master_and_bf16_copy(lib):
    """update: master += alpha g and its bf16 copy in one pass; scatter_add_rows adds repeated
    ids in order and refreshes exactly the rows it touched."""
    master = torch.randn(50, 6)
    g = torch.randn(50, 6).to(torch.bfloat16)
    lo = torch.zeros(50, 6, dtype=torch.bfloat16)
    want = master + 0.25 * g.float()
    lib.update(master.numel(), _p(master), _p(g), 0.25, _p(lo))
    assert torch.equal(master, want) and torch.equal(lo, want.to(torch.bfloat16))
    idx = torch.tensor([3, 7, 3, 49])
    rows = torch.randn(4, 6).to(torch.bfloat16)
    want = master.index_add(0, idx, rows.float(), alpha=-0.5)
    untouched = lo.clone()
    lib.scatter_add_rows(4, _p(idx), 6, -0.5, _p(rows), _p(master), _p(lo))
    assert torch.allclose(master, want, atol=1e-6)
    assert torch.equal(lo[idx], master[idx].to(torch.bfloat16))
    others = torch.ones(50, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(lo[others], untouched[others])


@pytest.mark.parametrize("cell", ["cifg", "lstm"])
@pytest.mark.parametrize("pad_id", [PAD_ID, None])
@pytest.mark.parametrize("seq_len", [6, 1])
def test_native_engine_trains_like_the_reference(lib, cell: str, pad_id: int | None, seq_len: int):
    """The whole engine: within 2% of the reference's update like the PyTorch-ops bf16 mode, and
    far closer still to that mode's update (the same roundings in another order); the loss within
    a rounding; with padded sentences, a short last batch, two epochs and a one-step sequence."""
    torch.manual_seed(0)
    vocab = 300
    shape = ModelShape(vocab, 8, 12, 8, cell)
    params = get_flat(NWPModel(vocab, 8, 12, 8, cell, init_scale=0.3))
    tokens = np.random.default_rng(1).integers(4, vocab, (13, seq_len + 1))
    tokens[:, 0] = 1
    tokens[2:5, -1] = PAD_ID
    sgd = LocalSGD(2, 5, 0.7)

    def train(engine):
        return engine.train_device(params, tokens, sgd, np.random.default_rng(3))

    ref, l_ref = train(ReferenceEngine(shape, pad_id))
    torch_bf16, _ = train(FusedEngine(shape, pad_id, "bf16"))
    eng = NativeFusedEngine(shape, lib, pad_id)
    d, loss = train(eng)
    assert d.dtype == np.float32 and eng.flat.dtype == torch.float32  # the fp32 master
    err = np.linalg.norm(d - ref) / np.linalg.norm(ref)
    assert 0 < err < 0.02
    # The same algorithm as the PyTorch-ops bf16 mode: measured 1e-6 to 1e-4 of the update apart,
    # 10 to 1000 times closer to it than either is to fp32.
    assert np.linalg.norm(d - torch_bf16) < 0.1 * np.linalg.norm(torch_bf16 - ref)
    assert loss == pytest.approx(l_ref, rel=1e-3)
    # The same engine, used again for another device, starts from that device's weights.
    again, _ = train(eng)
    assert np.array_equal(again, d)


def test_native_engine_regrows_its_buffers_across_chunks_and_a_tiny_vocabulary(lib):
    """A device after a smaller one (the buffers regrow), with more tokens a step (40 x 10 = 400)
    than the softmax takes in one chunk (320) and fewer words (20) than its block (32): the same
    update as a fresh engine's, and as the PyTorch-ops bf16 mode's within its own rounding."""
    torch.manual_seed(1)
    vocab = 20
    shape = ModelShape(vocab, 8, 12, 8, "cifg")
    params = get_flat(NWPModel(vocab, 8, 12, 8, "cifg", init_scale=0.3))
    small = np.random.default_rng(2).integers(4, vocab, (9, 7))
    big = np.random.default_rng(3).integers(4, vocab, (80, 11))
    small[:, 0] = big[:, 0] = 1
    big[5:9, 8:] = PAD_ID
    sgd = LocalSGD(1, 40, 0.5)

    def train(engine, tokens):
        return engine.train_device(params, tokens, sgd, np.random.default_rng(4))

    reused = NativeFusedEngine(shape, lib)
    train(reused, small)
    d, loss = train(reused, big)
    fresh, fresh_loss = train(NativeFusedEngine(shape, lib), big)
    assert np.array_equal(d, fresh) and loss == fresh_loss
    ref, _ = train(ReferenceEngine(shape), big)
    torch_bf16, _ = train(FusedEngine(shape, PAD_ID, "bf16"), big)
    assert np.linalg.norm(d - torch_bf16) < 0.1 * np.linalg.norm(torch_bf16 - ref)


def test_a_diverged_device_reports_a_nan_loss(lib):
    """The kernels assume finite values, yet the run's divergence guard reads the loss: a device
    whose weights are not finite reports NaN, as the PyTorch-ops engine does."""
    torch.manual_seed(0)
    shape = ModelShape(50, 8, 12, 8, "lstm")
    params = get_flat(NWPModel(50, 8, 12, 8, "lstm", init_scale=0.3))
    tokens = np.random.default_rng(1).integers(4, 50, (6, 5))
    tokens[:, 0] = 1
    eng = NativeFusedEngine(shape, lib)
    _, loss = eng.train_device(params, tokens, LocalSGD(1, 3, 0.5), np.random.default_rng(0))
    assert np.isfinite(loss)
    for bad in (np.where(np.arange(len(params)) == 7, np.nan, params), params * 1e30):
        d, loss = eng.train_device(
            bad.astype(np.float32), tokens, LocalSGD(1, 3, 1e6), np.random.default_rng(0)
        )
        assert np.isnan(loss) and not np.isfinite(d).all()


def test_make_engine_picks_kernels_and_says_why_not(monkeypatch, tmp_path):
    """bf16 takes the native kernels where they build; with no compiler it runs on PyTorch's ops
    (and the start-up header says why), `model.kernels=native` refuses to run without them, and
    asking for native kernels in fp32 is refused by name rather than ignored."""
    big = dict(vocab_size=300, embed_dim=8, hidden_dim=12, proj_dim=8, precision="bf16")
    monkeypatch.setattr(native, "_loaded", {})
    if native.load() is not None:
        assert isinstance(make_engine(ModelConfig(**big), "fused"), NativeFusedEngine)
    engine = make_engine(ModelConfig(**big, kernels="torch"), "fused")
    assert type(engine) is FusedEngine and engine.precision == "bf16"
    with pytest.raises(ConfigError, match="model.kernels=native.*fp32"):
        make_engine(ModelConfig(**{**big, "precision": "fp32"}, kernels="native"), "fused")
    with pytest.raises(ConfigError, match="model.kernels=native.*batched engine"):
        make_engine(ModelConfig(**big, kernels="native"), "batched")

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang either
    engine = make_engine(ModelConfig(**big), "fused")
    assert type(engine) is FusedEngine and engine.precision == "bf16"
    assert "no C compiler" in native.why_not()
    assert "not the native kernels: no C compiler" in _engine_name(SimpleNamespace(engine=engine))
    with pytest.raises(ConfigError, match="model.kernels=native: no C compiler"):
        make_engine(ModelConfig(**big, kernels="native"), "fused")


def test_build_is_cached_safe_to_race_and_leaves_the_fp_environment_alone(lib, tmp_path):
    """Two processes building into an empty cache at once both load a whole library and leave one
    file; a later process reuses it without compiling; an unwritable cache falls back to the temp
    dir; and loading leaves the process's floating-point environment as it was (no flush-to-zero:
    fp32 results elsewhere unchanged)."""
    probe = (
        "import numpy as np, time; from fleet.learning.engines import native; t = time.perf_counter(); "
        "lib = native.load(); assert lib is not None, native.why_not(); "
        "assert np.float32(1e-39) * np.float32(1) != 0, 'flush-to-zero'; "
        "print(time.perf_counter() - t)"
    )
    env = {**os.environ, "FLEET_CACHE_DIR": str(tmp_path)}
    racers = [subprocess.Popen([sys.executable, "-c", probe], env=env) for _ in range(2)]
    assert all(p.wait(120) == 0 for p in racers)
    built = list((tmp_path / "kernels").glob("*"))
    assert len(built) == 1 and built[0].suffix == ".so", built  # no temporary left behind
    stamp = built[0].stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=120)
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    # A cache that cannot be written (here a file where the folder should be) falls back to a
    # private folder in the temp dir rather than to PyTorch's ops.
    (tmp_path / "blocked").write_text("")
    where = "from fleet.learning.engines import native; print(native.load()._name)"
    out = subprocess.run(
        [sys.executable, "-c", where],
        env={**env, "FLEET_CACHE_DIR": str(tmp_path / "blocked")},
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"fleet-kernels-{os.getuid()}" in out.stdout
    # A cache folder others can write to is refused (code is loaded from it): PyTorch's ops, and why.
    shared = tmp_path / "shared"
    (shared / "kernels").mkdir(parents=True)
    (shared / "kernels").chmod(0o777)
    why = "from fleet.learning.engines import native; print(native.load(), native.why_not())"
    out = subprocess.run(
        [sys.executable, "-c", why],
        env={**env, "FLEET_CACHE_DIR": str(shared)},
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.startswith("None") and "not this user's alone" in out.stdout
