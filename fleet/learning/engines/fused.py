"""The fused CPU engine: a hand-written backward through time with the SGD step fused in."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from fleet.learning.engines.common import TINY, LocalSGD, OneAtATime, batches, check_inputs
from fleet.learning.model import PAD_ID, ModelShape

log = logging.getLogger(__name__)


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
        self.lo = {k[3:]: v for k, v in buf.items() if k.startswith("lo_")}  # bf16 mode's
        self.buf = buf  # every buffer by name, shaped, for a subclass's own
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


class FusedEngine(OneAtATime):
    """Hand-written forward/backward with fused SGD updates and reused buffers (module docstring).

    Layout: activations are time-major, (time, batch, features), so one timestep is a contiguous
    block and "all timesteps at once" is a plain 2-D matrix of time * batch rows.
    """

    kernels = "torch"  # every op is PyTorch's (NativeFusedEngine: bf16 on kernels.c)
    native_unavailable: str | None = None  # why bf16 runs here and not on the native kernels

    def __init__(self, shape: ModelShape, pad_id: int | None = PAD_ID, precision: str = "fp32"):
        self.shape = shape
        self.pad_id = pad_id
        self.flat = torch.empty(shape.num_params())
        self.w = {name: self.flat[part].view(s) for name, (part, s) in shape.param_slices().items()}
        # bf16: the big all-timestep GEMMs read a bf16 copy of the weights, refreshed from the fp32
        # master after every step. The master, the update, the recurrence and the loss stay fp32,
        # and the softmax is computed in fp32 (stored once, rounded, as the bf16 GEMMs' operand).
        self.precision = precision
        self.low = precision == "bf16"
        self.flat_lo = self.flat.to(torch.bfloat16) if self.low else self.flat
        self.w_lo = {name: self.flat_lo[part].view(s) for name, (part, s) in shape.param_slices().items()}
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
            "x": (0,) if self.low else (t * b, s.embed_dim),  # embedded inputs (bf16 mode: lo_x)
            "z": (t, b, gh),  # gates, after their activations
            "m": (t, b, gh),  # backward multipliers of the gates, then gate gradients
            "c": (t + 1, b, s.hidden_dim),  # cell states; c[0] = 0
            "tc": (t, b, s.hidden_dim),  # tanh(c), then d c / d h
            "h": (t, b, s.hidden_dim),
            "r": (t + 1, b, s.proj_dim),  # projected outputs; r[0] = 0
            "dr": (t, b, s.proj_dim),
            "dx": (t * b, s.embed_dim),
            # logits, then probabilities, then their gradient (bf16 mode: a bf16 buffer instead)
            "logits": (0,) if self.low else (t * b, s.vocab_total),
            "dh": (b, s.hidden_dim),
            "dc": (b, s.hidden_dim),
        }

    def _low_shapes(self, t: int, b: int) -> dict[str, tuple[int, ...]]:
        """bf16 operands and products of the big GEMMs (bf16 mode only)."""
        if not self.low:
            return {}
        s = self.shape
        gh = s.gates * s.hidden_dim
        return {
            "x": (t * b, s.embed_dim),
            "z": (t * b, gh),  # input-to-gates, then the gates' gradients
            "out": (t * b, s.proj_dim),
            "logits": (t * b, s.vocab_total),
            "dr": (t * b, s.proj_dim),
            "dx": (t * b, s.embed_dim),
            "g_emb": (s.vocab_total, s.embed_dim),
            "g_x": (s.embed_dim, gh),
            "g_r": (s.proj_dim, gh),
        }

    def _views(self, t: int, b: int) -> _Views:
        """The buffers shaped for a batch of b rows and t steps, with all their views.

        Buffers are allocated once for the largest batch seen; a smaller batch (the last one of
        an epoch) uses the leading part of each, which is contiguous in its own shape.
        """
        if t > self._cap[0] or b > self._cap[1]:
            self._cap = (max(t, self._cap[0]), max(b, self._cap[1]))
            self._buf = {k: torch.empty(math.prod(v)) for k, v in self._shapes(*self._cap).items()}
            lo = self._low_shapes(*self._cap).items()
            self._buf.update({f"lo_{k}": torch.empty(math.prod(v), dtype=torch.bfloat16) for k, v in lo})
            self._cache.clear()
        if (t, b) not in self._cache:
            shapes = self._shapes(t, b) | {f"lo_{k}": v for k, v in self._low_shapes(t, b).items()}
            bufs = {k: self._buf[k][: math.prod(v)].view(v) for k, v in shapes.items()}
            self._cache[(t, b)] = _Views(bufs, self.shape, t, b)
        return self._cache[(t, b)]

    def train_device(
        self, params: np.ndarray, tokens: np.ndarray, sgd: LocalSGD, rng: np.random.Generator
    ) -> tuple[np.ndarray, float]:
        epochs, batch_size, lr = sgd
        check_inputs(params, tokens, self.shape)
        params = np.asarray(params, dtype=np.float32)
        self.flat.numpy()[:] = params  # a numpy copy: the broadcast weights may be read-only
        if self.low:
            self._refresh_low()
        tok = torch.from_numpy(np.array(tokens, dtype=np.int64))  # a writable copy
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for rows in batches(len(tok), epochs, batch_size, rng):
                tm = tok[torch.from_numpy(rows)].t()  # (seq_len + 1, batch), time-major
                loss, n = self._step(tm[:-1].reshape(-1), tm[1:].reshape(-1), len(rows), lr)
                loss_sum += loss
                count += n
        return self.flat.numpy() - params, loss_sum / count if count else math.nan

    def _refresh_low(self) -> None:
        """The bf16 copies of the weights the bf16 GEMMs read (the recurrence reads fp32)."""
        for name in ("embedding", "w_x"):
            self.w_lo[name].copy_(self.w[name])

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
        v = self._views(t, b)
        self._forward(v, inp)
        nll_sum = self._output_layer(v, target, pad_rows, n, lr)
        self._backward_through_time(v, inp, lr)
        return nll_sum, n

    def _forward(self, v: _Views, inp: torch.Tensor) -> None:
        """Embedding, input-to-gates and the recurrence, into the views' buffers."""
        w, emb = self.w, self.w["embedding"]
        # Forward. Input-to-gates for all steps in one GEMM; then the recurrence. tanh(x) is
        # computed as 2 sigmoid(2x) - 1: one sigmoid over all gates costs less than a separate
        # tanh, which is several times slower per element than sigmoid in PyTorch on CPU.
        if self.low:
            torch.index_select(self.w_lo["embedding"], 0, inp, out=v.lo["x"])
            torch.mm(v.lo["x"], self.w_lo["w_x"], out=v.lo["z"])
            torch.add(v.lo["z"], w["bias"], out=v.z2)
        else:
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

    def _output_layer(
        self, v: _Views, target: torch.Tensor, pad_rows: torch.Tensor | None, n: int, lr: float
    ) -> float:
        """Logits, softmax cross-entropy and its gradient; the embedding's output-layer update and
        dr = d loss / d r for the backward through time. Returns the summed loss."""
        emb = self.w["embedding"]
        # Output layer and softmax cross-entropy, all steps at once, in one buffer. In bf16 mode
        # the buffer is bf16: the softmax kernel computes in fp32 and rounds its output once,
        # which is the rounding the backward GEMMs' bf16 operand needs anyway.
        if self.low:
            logits = v.lo["logits"]
            v.lo["out"].copy_(v.out)
            torch.mm(v.lo["out"], self.w_lo["embedding"].t(), out=logits)
        else:
            logits = v.logits
            torch.mm(v.out, emb.t(), out=logits)
        torch.softmax(logits, 1, out=logits)
        p_target = logits.gather(1, target.unsqueeze(1)).squeeze(1).float()
        nll = -torch.log(p_target.clamp(min=TINY))
        logits[v.rows, target] = (p_target - 1.0).to(logits.dtype)  # d(loss_sum)/d(logits) = p - onehot
        if pad_rows is not None:
            nll[pad_rows] = 0.0
            logits.index_fill_(0, pad_rows, 0.0)
        if self.low:
            lo = v.lo
            torch.mm(lo["logits"], self.w_lo["embedding"], out=lo["dr"])
            torch.mul(lo["dr"], 1.0 / n, out=v.dr2)
            torch.mm(lo["logits"].t(), lo["out"], out=lo["g_emb"])
            emb.add_(lo["g_emb"], alpha=-lr / n)
        else:
            torch.addmm(v.dr2, logits, emb, beta=0.0, alpha=1.0 / n, out=v.dr2)
            emb.addmm_(logits.t(), v.out, alpha=-lr / n)
        return float(nll.sum())

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
        if self.low:
            self._weight_updates_low(v, inp, lr)
            return
        if v.r_mid is not None:
            w["w_r"].addmm_(v.r_mid.t(), v.m_mid, alpha=-lr)
        torch.mm(dz, w["w_x"].t(), out=v.dx)
        w["w_x"].addmm_(v.x.t(), dz, alpha=-lr)
        w["bias"].sub_(dz.sum(0), alpha=lr)
        w["embedding"].index_add_(0, inp, v.dx, alpha=-lr)

    def _weight_updates_low(self, v: _Views, inp: torch.Tensor, lr: float) -> None:
        """The gates' weight updates of bf16 mode: bf16 GEMMs, added to the fp32 master."""
        w, lo, dz = self.w, v.lo, v.m2
        lo["z"].copy_(dz)
        b = v.dh.shape[0]
        t = len(inp) // b
        if t > 1:  # w_r's gradient pairs r_{s-1} (rows of `out` before the last step) with dz_s
            torch.mm(lo["out"][: (t - 1) * b].t(), lo["z"][b:], out=lo["g_r"])
            w["w_r"].add_(lo["g_r"], alpha=-lr)
        torch.mm(lo["z"], self.w_lo["w_x"].t(), out=lo["dx"])
        torch.mm(lo["x"].t(), lo["z"], out=lo["g_x"])
        w["w_x"].add_(lo["g_x"], alpha=-lr)
        w["bias"].sub_(dz.sum(0), alpha=lr)
        v.dx.copy_(lo["dx"])
        w["embedding"].index_add_(0, inp, v.dx, alpha=-lr)
        self._refresh_low()
