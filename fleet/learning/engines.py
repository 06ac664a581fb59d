"""Local training: E epochs of minibatch SGD on one device's examples, from the broadcast weights.

Three engines with one contract (`Engine.train_device`, and `Engine.train_devices` for a cohort):

- `ReferenceEngine`: the eager `NWPModel`, `loss.backward()` and a manual SGD step. Slow and
  obviously right; tests hold every other engine to its deltas.
- `FusedEngine`: the fast CPU engine. On CPU, devices are trained one after another (DESIGN.md
  step 4: batching devices in lockstep halves throughput there), so the speed comes from making
  one device's steps cheap:
    * a hand-written backward through time (no autograd graph, no optimizer object): every
      weight gradient is a single GEMM over all timesteps, fused with the SGD update through
      `addmm_(..., alpha=-lr)`, so gradients are never materialised;
    * the big matmuls (input-to-gates, logits, their gradients) run over all timesteps at once;
      only the recurrent matmuls (batch rows x proj_dim) are per step;
    * softmax cross-entropy in place in one logits buffer, reused as its own gradient;
    * every buffer preallocated once and reused across batches and devices, so large
      allocations (and their page faults) never recur.
  `python -m fleet.bench train` measures it against PyTorch's `nn.LSTM` loop and the machine's
  matmul rate (workload W1).
- `BatchedEngine`: the GPU engine. A GPU is kept busy only by large kernels, and one device's
  steps (batch 16 x one timestep) are far too small, so it trains `group` devices in lockstep:
  each device's weights are one row of a stacked (devices, params) tensor, every layer is a
  batched matmul over the devices, and plain autograd gives each row its own device's gradient
  (devices never mix: the loss is a sum of per-device losses). Devices whose step sequence is
  shorter (fewer examples) ride along on masked rows that carry exactly zero gradient. On CPU
  it is slower than the fused engine at Gboard size (DESIGN.md step 4), so `auto` picks it only
  when the shard has a GPU.

Semantics shared by both engines: `tokens` is (n, seq_len + 1) = [bos, w1..w_seq_len]; the input
is tokens[:, :-1] and the target tokens[:, 1:]. Targets equal to `pad_id` are left out of the loss,
which is the mean cross-entropy over the batch's remaining targets; a batch with none is skipped.
Each epoch visits the examples in the order `rng.permutation(n)`, in batches of `batch_size`
(the last one may be smaller). The returned loss is the mean over all counted targets of all
steps, each measured before its step's update.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn import functional

from fleet.config import ConfigError
from fleet.learning.model import PAD_ID, ModelShape, NWPModel, get_flat, set_flat

log = logging.getLogger(__name__)

# Probabilities are clamped here before the log that gives the reported loss, so a target the
# model rules out entirely costs at most -log(tiny) ~ 87 instead of inf (the gradient is exact).
_TINY = float(torch.finfo(torch.float32).tiny)


class Engine(Protocol):
    def train_device(
        self,
        params: np.ndarray,
        tokens: np.ndarray,
        epochs: int,
        batch_size: int,
        lr: float,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, float]:
        """tokens: int array (n, seq_len+1) = [bos, w1..w_seq_len]; input tokens[:, :-1], target
        tokens[:, 1:]; pad targets are excluded from the loss (mean cross-entropy over non-pad
        targets per batch). Plain minibatch SGD with lr, E epochs, batches of batch_size in an
        order given by rng.permutation(n) each epoch. Returns (delta = local - params as flat
        float32, mean training loss)."""

    def train_devices(
        self,
        params: np.ndarray,
        jobs: Iterable[tuple[np.ndarray, np.random.Generator]],
        epochs: int,
        batch_size: int,
        lr: float,
    ) -> Iterator[tuple[np.ndarray, float]]:
        """`train_device` for each (tokens, rng) of a cohort, results in the cohort's order. `jobs`
        is consumed lazily, as far as the engine needs, so a shard never holds the whole cohort's
        data at once."""


class _OneAtATime:
    """`train_devices` for engines that train devices one after another."""

    def train_devices(
        self,
        params: np.ndarray,
        jobs: Iterable[tuple[np.ndarray, np.random.Generator]],
        epochs: int,
        batch_size: int,
        lr: float,
    ) -> Iterator[tuple[np.ndarray, float]]:
        for tokens, order in jobs:
            yield self.train_device(params, tokens, epochs, batch_size, lr, order)


def _batches(n: int, epochs: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of every step, in training order (the contract both engines share)."""
    out = []
    for _ in range(epochs):
        order = rng.permutation(n)
        out.extend(order[s : s + batch_size] for s in range(0, n, batch_size))
    return out


def _check(params: np.ndarray, tokens: np.ndarray, shape: ModelShape) -> None:
    if params.shape != (shape.num_params(),):
        raise ValueError(f"params: expected shape ({shape.num_params()},), got {params.shape}")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens: expected (n, seq_len + 1) with seq_len >= 1, got {tokens.shape}")
    # Checked on the host: on a GPU an id out of range is a device-side assert that poisons the
    # process's CUDA context for good, not an exception.
    if tokens.size and (tokens.min() < 0 or tokens.max() >= shape.vocab_total):
        raise ValueError(
            f"tokens: ids must be in [0, {shape.vocab_total}), got [{tokens.min()}, {tokens.max()}]"
        )


class ReferenceEngine(_OneAtATime):
    """Plain eager PyTorch, one device at a time: the ground truth for every other engine."""

    def __init__(self, shape: ModelShape, pad_id: int | None = PAD_ID):
        self.shape = shape
        self.pad_id = pad_id
        self.model = NWPModel(
            shape.vocab_total, shape.embed_dim, shape.hidden_dim, shape.proj_dim, shape.cell
        )

    def train_device(
        self,
        params: np.ndarray,
        tokens: np.ndarray,
        epochs: int,
        batch_size: int,
        lr: float,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, float]:
        _check(params, tokens, self.shape)
        set_flat(self.model, params)
        tok = torch.from_numpy(np.array(tokens, dtype=np.int64))  # a writable copy
        ignore = -100 if self.pad_id is None else self.pad_id
        loss_sum, count = 0.0, 0
        for rows in _batches(len(tok), epochs, batch_size, rng):
            batch = tok[torch.from_numpy(rows)]
            target = batch[:, 1:].reshape(-1)
            n = int((target != ignore).sum())
            if n == 0:
                continue
            logits = self.model(batch[:, :-1])
            loss = functional.cross_entropy(
                logits.reshape(-1, self.shape.vocab_total), target, ignore_index=ignore
            )
            self.model.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p in self.model.parameters():
                    p.sub_(lr * p.grad)
            loss_sum += loss.item() * n
            count += n
        delta = get_flat(self.model) - np.asarray(params, dtype=np.float32)
        return delta, loss_sum / count if count else math.nan


class FusedEngine(_OneAtATime):
    """Hand-written forward/backward with fused SGD updates and reused buffers (module docstring).

    Layout: activations are time-major, (time, batch, features), so one timestep is a contiguous
    block and "all timesteps at once" is a plain 2-D matrix of time * batch rows.
    """

    def __init__(self, shape: ModelShape, pad_id: int | None = PAD_ID):
        self.shape = shape
        self.pad_id = pad_id
        self.flat = torch.empty(shape.num_params())
        self.w = {name: self.flat[part].view(s) for name, (part, s) in shape.param_slices().items()}
        self._cap = (0, 0)  # (seq_len, batch rows) the buffers are sized for
        self._buf: dict[str, torch.Tensor] = {}
        self._cache: dict[tuple[int, int], _Views] = {}
        # 0-dim tensors, not Python floats, in per-step ops: a float is wrapped into a fresh
        # tensor and cast on every call, which doubles the cost of a small elementwise op.
        self._one, self._two = torch.tensor(1.0), torch.tensor(2.0)

    def _shapes(self, t: int, b: int) -> dict[str, tuple[int, ...]]:
        s = self.shape
        gh = s.gates * s.hidden_dim
        return {
            "x": (t * b, s.embed_dim),  # embedded inputs
            "z": (t, b, gh),  # gates, after their activations
            "m": (t, b, gh),  # backward multipliers of the gates, then gate gradients
            "c": (t + 1, b, s.hidden_dim),  # cell states; c[0] = 0
            "tc": (t, b, s.hidden_dim),  # tanh(c), then d c / d h
            "h": (t, b, s.hidden_dim),
            "r": (t + 1, b, s.proj_dim),  # projected outputs; r[0] = 0
            "dr": (t, b, s.proj_dim),
            "dx": (t * b, s.embed_dim),
            "logits": (t * b, s.vocab_total),  # logits, then probabilities, then their gradient
            "dh": (b, s.hidden_dim),
            "dc": (b, s.hidden_dim),
        }

    def _views(self, t: int, b: int) -> _Views:
        """The buffers shaped for a batch of b rows and t steps, with all their views.

        Buffers are allocated once for the largest batch seen; a smaller batch (the last one of
        an epoch) uses the leading part of each, which is contiguous in its own shape.
        """
        if t > self._cap[0] or b > self._cap[1]:
            self._cap = (max(t, self._cap[0]), max(b, self._cap[1]))
            self._buf = {k: torch.empty(math.prod(v)) for k, v in self._shapes(*self._cap).items()}
            self._cache.clear()
        if (t, b) not in self._cache:
            bufs = {k: self._buf[k][: math.prod(v)].view(v) for k, v in self._shapes(t, b).items()}
            self._cache[(t, b)] = _Views(bufs, self.shape, t, b)
        return self._cache[(t, b)]

    def train_device(
        self,
        params: np.ndarray,
        tokens: np.ndarray,
        epochs: int,
        batch_size: int,
        lr: float,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, float]:
        _check(params, tokens, self.shape)
        params = np.asarray(params, dtype=np.float32)
        self.flat.numpy()[:] = params  # a numpy copy: the broadcast weights may be read-only
        tok = torch.from_numpy(np.array(tokens, dtype=np.int64))  # a writable copy
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for rows in _batches(len(tok), epochs, batch_size, rng):
                tm = tok[torch.from_numpy(rows)].t()  # (seq_len + 1, batch), time-major
                loss, n = self._step(tm[:-1].reshape(-1), tm[1:].reshape(-1), len(rows), lr)
                loss_sum += loss
                count += n
        return self.flat.numpy() - params, loss_sum / count if count else math.nan

    def _step(self, inp: torch.Tensor, target: torch.Tensor, b: int, lr: float) -> tuple[float, int]:
        """One SGD step on a time-major batch; returns (summed loss, counted targets)."""
        t = len(inp) // b
        if self.pad_id is None:
            n, pad_rows = t * b, None
        else:
            pad = target == self.pad_id
            n = t * b - int(pad.sum())
            if n == 0:
                return 0.0, 0
            pad_rows = pad.nonzero().squeeze(1) if n < t * b else None
        w, v = self.w, self._views(t, b)
        emb = w["embedding"]

        # Forward. Input-to-gates for all steps in one GEMM; then the recurrence. tanh(x) is
        # computed as 2 sigmoid(2x) - 1: one sigmoid over all gates costs less than a separate
        # tanh, which is several times slower per element than sigmoid in PyTorch on CPU.
        torch.index_select(emb, 0, inp, out=v.x)
        torch.addmm(w["bias"], v.x, w["w_x"], out=v.z2)
        v.c[0].zero_()
        v.r[0].zero_()
        cifg = self.shape.cell == "cifg"
        w_r, w_p, one, two = w["w_r"], w["w_p"], self._one, self._two
        for zs, o, i, f, g, c0, c1, tc, h, r0, r1 in v.forward:
            if r0 is not None:
                zs.addmm_(r0, w_r)
            g.mul_(two)
            zs.sigmoid_()
            g.mul_(two).sub_(one)
            if cifg:
                torch.lerp(c0, g, i, out=c1)  # (1 - i) c + i g
            else:
                torch.mul(i, g, out=c1)
                c1.addcmul_(f, c0)
            torch.mul(c1, two, out=tc)
            tc.sigmoid_()
            tc.mul_(two).sub_(one)
            torch.mul(o, tc, out=h)
            torch.mm(h, w_p, out=r1)

        # Output layer and softmax cross-entropy, all steps at once, in one buffer.
        logits = v.logits
        torch.mm(v.out, emb.t(), out=logits)
        torch.softmax(logits, 1, out=logits)
        p_target = logits.gather(1, target.unsqueeze(1)).squeeze(1)
        nll = -torch.log(p_target.clamp(min=_TINY))
        logits[v.rows, target] = p_target - 1.0  # d(loss_sum)/d(logits) = p - onehot
        if pad_rows is not None:
            nll[pad_rows] = 0.0
            logits.index_fill_(0, pad_rows, 0.0)
        torch.addmm(v.dr2, logits, emb, beta=0.0, alpha=1.0 / n, out=v.dr2)
        emb.addmm_(logits.t(), v.out, alpha=-lr / n)

        self._backward_through_time(v, inp, lr)
        return float(nll.sum()), n

    def _backward_through_time(self, v: _Views, inp: torch.Tensor, lr: float) -> None:
        """Gate gradients step by step from dr (already d loss / d r_t from the output layer), then
        every weight update as one GEMM over all steps."""
        w = self.w
        hd = self.shape.hidden_dim
        z, m, c, tc = v.z, v.m, v.c, v.tc
        o, i, g = z[..., :hd], z[..., hd : 2 * hd], z[..., -hd:]
        cifg = self.shape.cell == "cifg"

        # Everything the step needs that does not depend on dc, vectorised over all steps:
        # dz_o = dh * tanh(c) o (1 - o); dz_i = dc * [g or (g - c_prev)] i (1 - i);
        # dz_f = dc * c_prev f (1 - f); dz_g = dc * i (1 - g^2); dc += dh * o (1 - tanh(c)^2).
        # The sigmoid gates are one block, so s (1 - s) = s - s^2 is two passes for all of them.
        sig = (self.shape.gates - 1) * hd
        one = self._one
        torch.mul(z[..., :sig], z[..., :sig], out=m[..., :sig])
        torch.sub(z[..., :sig], m[..., :sig], out=m[..., :sig])
        m[..., :hd].mul_(tc)
        m[..., hd : 2 * hd].mul_(g - c[:-1] if cifg else g)
        if not cifg:
            m[..., 2 * hd : 3 * hd].mul_(c[:-1])
        m_g = m[..., -hd:]
        torch.mul(g, g, out=m_g)
        torch.sub(one, m_g, out=m_g)
        m_g.mul_(i)
        tc.mul_(tc)
        torch.sub(one, tc, out=tc)
        tc.mul_(o)  # tc := o (1 - tanh(c)^2)

        dh, dc, dc3 = v.dh, v.dc, v.dc3
        dc.zero_()
        w_r_t, w_p_t = w["w_r"].t(), w["w_p"].t()
        for dr, m1, m_o, m_dc, dcdh, keep in v.backward:
            if m1 is not None:
                dr.addmm_(m1, w_r_t)
            torch.mm(dr, w_p_t, out=dh)
            m_o.mul_(dh)
            dc.addcmul_(dh, dcdh)
            m_dc.mul_(dc3)
            if cifg:
                dc.addcmul_(dc, keep, value=-1.0)  # dc_prev = dc (1 - i)
            else:
                dc.mul_(keep)  # dc_prev = dc f

        dz = v.m2
        w["w_p"].addmm_(v.h2.t(), v.dr2, alpha=-lr)
        if v.r_mid is not None:
            w["w_r"].addmm_(v.r_mid.t(), v.m_mid, alpha=-lr)
        torch.mm(dz, w["w_x"].t(), out=v.dx)
        w["w_x"].addmm_(v.x.t(), dz, alpha=-lr)
        w["bias"].sub_(dz.sum(0), alpha=lr)
        w["embedding"].index_add_(0, inp, v.dx, alpha=-lr)


class _Views:
    """Every view the fused step uses, built once per (steps, batch rows) and reused.

    Slicing costs microseconds per view in PyTorch; built per step, the views were a few percent of
    the whole step, so they are made once and the step loops over ready-made tuples.
    """

    def __init__(self, buf: dict[str, torch.Tensor], shape: ModelShape, t: int, b: int):
        hd = shape.hidden_dim
        self.x, self.z, self.m, self.c = buf["x"], buf["z"], buf["m"], buf["c"]
        self.tc, self.h, self.r, self.dr = buf["tc"], buf["h"], buf["r"], buf["dr"]
        self.dx, self.logits, self.dh, self.dc = buf["dx"], buf["logits"], buf["dh"], buf["dc"]
        self.dc3 = self.dc.unsqueeze(1)  # dc broadcast over the gate blocks it scales
        self.z2 = self.z.view(t * b, -1)
        self.m2 = self.m.view(t * b, -1)
        self.dr2 = self.dr.view(t * b, -1)
        self.h2 = self.h.view(t * b, -1)
        self.out = self.r[1:].view(t * b, -1)
        self.rows = torch.arange(t * b)
        # w_r's gradient pairs r[s] (= r_{s-1}) with the gate gradients of step s >= 1.
        self.r_mid = self.r[1:t].reshape((t - 1) * b, -1) if t > 1 else None
        self.m_mid = self.m[1:].reshape((t - 1) * b, -1) if t > 1 else None
        cifg = shape.cell == "cifg"
        z = self.z
        # Per step s: (z_s, o, i, f or None, g, c_prev, c_s, tanh(c_s), h_s, r_prev or None, r_s).
        self.forward = [
            (
                z[s],
                z[s, :, :hd],
                z[s, :, hd : 2 * hd],
                None if cifg else z[s, :, 2 * hd : 3 * hd],
                z[s, :, -hd:],
                self.c[s],
                self.c[s + 1],
                self.tc[s],
                self.h[s],
                self.r[s] if s else None,
                self.r[s + 1],
            )
            for s in range(t)
        ]
        # Per step s, last first: (dr_s, dz_{s+1} or None, dz_o block, the (b, gates - 1, hd)
        # block scaled by dc, d c / d h, and what carries dc back: i (CIFG) or f).
        self.backward = [
            (
                self.dr[s],
                self.m[s + 1] if s < t - 1 else None,
                self.m[s, :, :hd],
                self.m[s, :, hd:].view(b, -1, hd),
                self.tc[s],
                z[s, :, hd : 2 * hd] if cifg else z[s, :, 2 * hd : 3 * hd],
            )
            for s in range(t - 1, -1, -1)
        ]


class BatchedEngine:
    """Devices in lockstep on one torch device, `group` at a time (module docstring).

    Step k of the lockstep trains, for every device of the group, that device's own k-th batch
    (from its own rng, exactly as the other engines order it); a device with fewer steps, or a
    short last batch, fills the rest with masked rows. Results equal the reference engine's within
    float tolerance (tested), so the choice of engine never changes what a run means.
    """

    def __init__(
        self,
        shape: ModelShape,
        pad_id: int | None = PAD_ID,
        device: str = "cpu",
        group: int = 32,
        deterministic: bool = True,
    ):
        if group < 1:
            raise ValueError(f"model.batch_devices: must be >= 1 (got {group})")
        self.shape = shape
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.group = group
        self._slices = shape.param_slices()
        if deterministic and self.device.type == "cuda":
            # Reproducible mode promises the same model run after run (and across a resume). On
            # CUDA the embedding's gradient accumulates with atomics in a varying order unless
            # PyTorch uses its deterministic kernels, and cuBLAS needs a fixed workspace for its
            # own; both must be set before this process first touches the GPU.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)

    def train_device(
        self,
        params: np.ndarray,
        tokens: np.ndarray,
        epochs: int,
        batch_size: int,
        lr: float,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, float]:
        return next(self.train_devices(params, [(tokens, rng)], epochs, batch_size, lr))

    def train_devices(
        self,
        params: np.ndarray,
        jobs: Iterable[tuple[np.ndarray, np.random.Generator]],
        epochs: int,
        batch_size: int,
        lr: float,
    ) -> Iterator[tuple[np.ndarray, float]]:
        jobs = iter(jobs)
        base = None
        while chunk := list(islice(jobs, self.group)):
            for tokens, _ in chunk:
                _check(params, tokens, self.shape)
            if base is None:
                base = torch.from_numpy(np.array(params, dtype=np.float32)).to(self.device)
            deltas, losses = self._train_group(base, chunk, epochs, batch_size, lr)
            yield from zip(deltas, losses, strict=True)

    def _train_group(
        self,
        base: torch.Tensor,
        chunk: list[tuple[np.ndarray, np.random.Generator]],
        epochs: int,
        batch_size: int,
        lr: float,
    ) -> tuple[np.ndarray, list[float]]:
        width = {tokens.shape[1] for tokens, _ in chunk}
        if len(width) != 1:
            raise ValueError(f"tokens: every device of a group needs the same sequence length, got {width}")
        steps = [_batches(len(tokens), epochs, batch_size, order) for tokens, order in chunk]
        d, k, t1 = len(chunk), max(len(s) for s in steps), width.pop()
        # Every step's tokens and row mask, built on the host and moved once.
        tok = np.zeros((k, d, batch_size, t1), dtype=np.int64)
        valid = np.zeros((k, d, batch_size), dtype=bool)
        for j, ((tokens, _), rows) in enumerate(zip(chunk, steps, strict=True)):
            for step, r in enumerate(rows):
                tok[step, j, : len(r)] = tokens[r]
                valid[step, j, : len(r)] = True
        tok_t = torch.from_numpy(tok).to(self.device)
        valid_t = torch.from_numpy(valid).to(self.device)
        flat = base.expand(d, -1).clone().requires_grad_(True)
        loss_sum = torch.zeros(d, dtype=torch.float64, device=self.device)
        count = torch.zeros(d, dtype=torch.int64, device=self.device)
        for step in range(k):
            loss, nll_sum, n = self._loss(flat, tok_t[step], valid_t[step])
            loss.backward()
            with torch.no_grad():
                # Only devices with targets in this step move, as in the reference engine, which
                # skips such a step. Their gradient is zero anyway, except that a device whose own
                # weights overflow its masked rows' logits would get 0 * nan = nan from them.
                flat.sub_(torch.where((n > 0).unsqueeze(1), flat.grad, 0.0), alpha=lr)
            flat.grad = None
            loss_sum += nll_sum.double()
            count += n
        with torch.no_grad():
            deltas = (flat - base).cpu().numpy()
        sums, counts = loss_sum.cpu().numpy(), count.cpu().numpy()
        losses = [float(s / c) if c else math.nan for s, c in zip(sums, counts, strict=True)]
        return deltas, losses

    def _loss(
        self, flat: torch.Tensor, tok: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sum over devices of each device's mean cross-entropy on its batch; also each device's
        summed loss and counted targets. tok (devices, rows, seq_len + 1), valid (devices, rows)."""
        w = {name: flat[:, part].view(-1, *s) for name, (part, s) in self._slices.items()}
        d, b, t1 = tok.shape
        t, hd, e = t1 - 1, self.shape.hidden_dim, self.shape.embed_dim
        inp, target = tok[:, :, :-1], tok[:, :, 1:].reshape(d, b * t)
        emb = w["embedding"]
        which = torch.arange(d, device=tok.device).view(d, 1, 1)
        x = emb[which, inp].view(d, b * t, e)  # each device's lookup in its own table
        gx = torch.baddbmm(w["bias"].unsqueeze(1), x, w["w_x"]).view(d, b, t, -1)
        r = x.new_zeros(d, b, self.shape.proj_dim)
        c = x.new_zeros(d, b, hd)
        outs = []
        for s in range(t):
            z = gx[:, :, s] + torch.bmm(r, w["w_r"])
            o = torch.sigmoid(z[..., :hd])
            i = torch.sigmoid(z[..., hd : 2 * hd])
            f = 1.0 - i if self.shape.cell == "cifg" else torch.sigmoid(z[..., 2 * hd : 3 * hd])
            g = torch.tanh(z[..., -hd:])
            c = f * c + i * g
            r = torch.bmm(o * torch.tanh(c), w["w_p"])
            outs.append(r)
        out = torch.stack(outs, dim=2).view(d, b * t, -1)
        logits = torch.bmm(out, emb.transpose(1, 2))
        nll = functional.cross_entropy(logits.view(d * b * t, -1), target.reshape(-1), reduction="none").view(
            d, b * t
        )
        mask = valid.unsqueeze(2).expand(d, b, t).reshape(d, b * t)
        if self.pad_id is not None:
            mask = mask & (target != self.pad_id)
        n = mask.sum(1)
        # where, not multiply: a masked row's loss never reaches the gradient, even if not finite.
        nll_sum = torch.where(mask, nll, 0.0).sum(1)
        loss = (nll_sum / n.clamp(min=1)).sum()
        return loss, nll_sum.detach(), n


ENGINES = ("auto", "fused", "reference", "batched")


def resolve_device(mcfg: Any, gpus: float = 0.0, engine: str = "auto") -> str:
    """The torch device local training runs on: `model.device`, or with "auto" CUDA when this
    process was given a GPU (`ray.gpus_per_shard` > 0) and the engine can use it, else CPU."""
    want = str(mcfg.device)
    if want == "auto":
        if engine in ("fused", "reference") or gpus <= 0:
            return "cpu"
        if not torch.cuda.is_available():
            log.warning("this shard was given %g GPU(s) but sees no CUDA device; training on CPU", gpus)
            return "cpu"
        return "cuda"
    if want == "cpu":
        return want
    if not want.startswith("cuda"):
        raise ConfigError(f"model.device: unknown value {want!r}; expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"model.device: {want!r} but this shard sees no CUDA device (is PyTorch built with CUDA, "
            "and does ray.gpus_per_shard give it a GPU?); use model.device=auto or cpu"
        )
    index = int(want.split(":")[1]) if ":" in want else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"model.device: {want!r} but this shard sees {torch.cuda.device_count()} CUDA device(s) "
            "(Ray numbers each shard's own GPUs from 0)"
        )
    return want


def make_engine(
    mcfg: Any,
    name: str = "auto",
    pad_id: int | None = PAD_ID,
    gpus: float = 0.0,
    deterministic: bool = True,
) -> Engine:
    """The engine for a `fleet.config.ModelConfig`: "auto" is the batched engine on a GPU and the
    fused engine (the fastest on CPU) otherwise. `gpus` is what the calling shard was given;
    `deterministic` (reproducible mode) asks a GPU for its deterministic kernels.

    `pad_id=None` counts every target (the W1 benchmark, whose token ids are all words).
    """
    shape = ModelShape.from_config(mcfg)
    if name not in ENGINES:
        raise ConfigError(f"model.engine: unknown value {name!r}; expected one of {', '.join(ENGINES)}")
    device = resolve_device(mcfg, gpus, name)
    if name == "batched" or (name == "auto" and device != "cpu"):
        return BatchedEngine(shape, pad_id, device, int(mcfg.batch_devices), deterministic)
    if device != "cpu":
        raise ConfigError(f"model.engine: {name!r} runs on CPU only; use model.engine=batched on {device}")
    if name == "reference":
        return ReferenceEngine(shape, pad_id)
    return FusedEngine(shape, pad_id)
