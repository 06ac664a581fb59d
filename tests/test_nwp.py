"""Next-word prediction through the fleet: evaluation metrics, learning, an Arrow-defined fleet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SMALL_NWP, in_process_fleet, make_cfg, write_users_jsonl

from fleet.learning.tasks.nwp import evaluate_tokens
from fleet.round.coordinator import Coordinator
from fleet.round.devices import fleet_size
from fleet.round.shard import ShardCore


class FixedLogits(torch.nn.Module):
    """Predicts the same ranking everywhere: token 5, then 3 (oov), then 6, then 7."""

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, 10)
        logits[..., 5], logits[..., 3], logits[..., 6], logits[..., 7] = 4.0, 3.0, 2.0, 1.0
        return logits


def test_recall_excludes_pad_and_handles_oov():
    # targets (after bos): 5 (hit@1), 3 (oov: hit@3 with oov, excluded without), 6, 9, pad, pad
    tokens = np.array([[1, 5, 3, 6, 9, 0, 0]], dtype=np.int32)
    m = evaluate_tokens(FixedLogits(), tokens)
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@3"] == pytest.approx(3 / 4)
    # Without oov: targets 5, 6, 9; oov is never predicted, so the top 3 are 5, 6, 7.
    assert m["recall@1_no_oov"] == pytest.approx(1 / 3)
    assert m["recall@3_no_oov"] == pytest.approx(2 / 3)
    logp = torch.log_softmax(FixedLogits()(torch.zeros(1, 1, dtype=torch.long))[0, 0], -1)
    want = -float(logp[[5, 3, 6, 9]].mean())
    assert m["eval_loss"] == pytest.approx(want, rel=1e-5)


def test_short_run_beats_the_unigram_baseline():
    cfg = make_cfg(*SMALL_NWP, "privacy.noise_multiplier=0.3", "fleet.goal=20", "train.client_lr=1.0")
    _, coord = in_process_fleet(cfg)
    first = coord.evaluate()
    for _ in range(25):
        coord.run_round()
    last = coord.evaluate()
    assert last["eval_loss"] < first["eval_loss"] - 0.5
    assert last["recall@1"] > last["unigram_recall@1"] + 0.02, last


def test_engine_choice_does_not_change_the_run():
    """The same DP rounds with the fused and the batched (lockstep) engine give the same model and
    the same clipped sums: the engine is a speed choice, never a change of mechanism."""
    runs = {}
    for engine in ("fused", "batched"):
        cfg = make_cfg(*SMALL_NWP, "fleet.goal=12", f"model.engine={engine}", "model.batch_devices=5")
        _, coord = in_process_fleet(cfg)
        lines = [coord.run_round() for _ in range(2)]
        runs[engine] = (coord.get_params().copy(), lines)
    (p_f, l_f), (p_b, l_b) = runs["fused"], runs["batched"]
    assert [x["reported"] for x in l_f] == [x["reported"] for x in l_b] and l_f[0]["reported"] >= 10
    for a, b in zip(l_f, l_b, strict=True):
        assert b["clipped_sum_norm"] == pytest.approx(a["clipped_sum_norm"], rel=1e-4)
    np.testing.assert_allclose(p_b, p_f, rtol=0, atol=1e-4)


def test_dp_round_on_nwp_is_clipped_and_noised():
    cfg = make_cfg(*SMALL_NWP, "fleet.goal=10", "privacy.clip_norm=0.1", "privacy.noise_multiplier=1.0")
    pop = cfg.fleet.population
    coord = Coordinator(cfg, [ShardCore(cfg, 0, 0, pop)], pop)
    line = coord.run_round()
    assert line["released"] and line["epsilon"] > 0
    assert line["clipped_sum_norm"] <= 0.1 * line["reported"] + 1e-6
    assert line["noise_norm"] > 0


def test_arrow_corpus_defines_the_fleet(tmp_path):
    from fleet.learning.data import ingest

    src = write_users_jsonl(tmp_path / "raw.jsonl", per_user=(1, 6))
    out = tmp_path / "corpus"
    ingest.main(
        [
            str(src),
            str(out),
            "--user-column",
            "user",
            "--vocab-size",
            "50",
            "--eval-fraction",
            "0.2",
            "--no-progress",
        ]
    )
    cfg = make_cfg(*SMALL_NWP, "data=arrow", f"data.path={out}", "model.vocab_size=50", "fleet.goal=5")
    pop = fleet_size(cfg)
    assert 30 <= pop < 60  # the training devices of the corpus, not fleet.population
    shard = ShardCore(cfg, 0, 0, pop)
    counts = shard.cols["num_examples"]
    assert counts.min() >= 1 and counts.max() <= 5
    coord = Coordinator(cfg, [shard], pop)
    line = coord.run_round()
    assert line["reported"] >= 1


def test_bf16_training_leaves_the_privacy_path_in_fp32(monkeypatch):
    """Whatever the engine's precision, what privacy rests on is fp32 or wider: each device's
    update reaches the clip as fp32, its norm is taken in float64, the clipped update is fp32 and
    within the bound, the sum and the noise are float64; and the noise and the ledger are the same
    as an fp32 run's (same seed), so precision changes the model, never the mechanism."""
    import fleet.round.shard as shard_module
    from fleet.privacy.noise import NoiseSource

    seen: dict[str, list] = {"clip": [], "noise": []}
    real_clip, real_add = shard_module.clip, NoiseSource.add

    def clip(delta, clip_norm):
        clipped, norm = real_clip(delta, clip_norm)
        exact = float(np.linalg.norm(np.asarray(delta, dtype=np.float64)))
        seen["clip"].append((delta.dtype, norm, exact, clipped.dtype, float(np.linalg.norm(clipped))))
        return clipped, norm

    def add(self, x, std, round_idx, stream):
        out = real_add(self, x, std, round_idx, stream)
        seen["noise"].append((np.asarray(x).dtype, out.dtype, float(np.linalg.norm(out - x))))
        return out

    monkeypatch.setattr(shard_module, "clip", clip)
    monkeypatch.setattr(NoiseSource, "add", add)
    from fleet.learning.engines import native

    runs = {}
    # bf16 on PyTorch's ops, bf16 on the native kernels where this machine can build them, fp32.
    modes = [("bf16", "torch")] + [("bf16", "native")] * (native.load() is not None) + [("fp32", "auto")]
    for precision, kernels in modes:
        seen["clip"].clear(), seen["noise"].clear()
        cfg = make_cfg(
            *SMALL_NWP,
            "fleet.goal=10",
            "privacy.clip_norm=0.05",
            f"model.precision={precision}",
            f"model.kernels={kernels}",
        )
        shards, coord = in_process_fleet(cfg)
        assert {s.task.engine.precision for s in shards} == {precision}
        assert {s.task.engine.kernels for s in shards} == {"native" if kernels == "native" else "torch"}
        lines = [coord.run_round() for _ in range(2)]
        runs[precision, kernels] = (lines, list(seen["noise"]), coord.get_params().copy())
        assert len(seen["clip"]) >= 10
        for d_type, norm, exact, c_type, c_norm in seen["clip"]:
            assert d_type == np.float32 and c_type == np.float32
            assert norm == exact  # the norm the clip uses is the float64 one
            assert c_norm <= 0.05 * (1 + 1e-6)
        assert all(x == np.float64 and out == np.float64 for x, out, _ in seen["noise"])
    l_f, n_f, p_f = runs["fp32", "auto"]
    for precision, kernels in modes[:-1]:
        l_b, n_b, p_b = runs[precision, kernels]
        assert [x["epsilon"] for x in l_b] == [x["epsilon"] for x in l_f]
        assert [x["reported"] for x in l_b] == [x["reported"] for x in l_f]
        assert [n for *_, n in n_b] == pytest.approx([n for *_, n in n_f], rel=1e-9)  # the same noise
        assert not np.array_equal(p_b, p_f)  # and the model did train in bf16
