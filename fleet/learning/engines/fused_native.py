"""The fused engine's bf16 mode on native kernels (kernels.c, built by native.py).

Same step, same precision contract as `FusedEngine` in bf16 (fp32 masters, recurrence, update
and loss; bf16 operands and products of the big GEMMs, each rounded once), with three changes
that the PyTorch-ops version cannot make:

- **Fused elementwise work.** A timestep's gate arithmetic is one kernel call (forward) and one
  (backward) instead of about ten PyTorch ops of a few microseconds each; the softmax
  cross-entropy and its gradient are one call; a weight update and the refresh of its bf16 copy
  are one pass.
- **Operands in the layout each GEMM reads fastest.** oneDNN's GEMMs ran 1.4-2.1x faster here
  when no operand is transposed. The logits are computed transposed (vocabulary x tokens,
  `embedding @ out^T`), so the embedding's gradient (`logits @ out` in that layout) reads
  neither operand transposed; small transposed copies of x and out (tokens x 96) and an fp32
  transposed copy of w_r (refreshed once a step) do the same for the gates' weight gradients
  and the backward recurrence. Only dr (`logits^T @ embedding`) reads one transposed.
- **No whole-weight refresh after a step**: each update writes its bf16 copy as it goes.

`python -m fleet.bench w1` measures it beside the fp32 engine and the PyTorch-ops bf16 mode.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import torch

from fleet.learning.engines.common import LocalSGD
from fleet.learning.engines.fused import FusedEngine, _Views
from fleet.learning.model import PAD_ID, ModelShape


def _p(t: torch.Tensor) -> int:
    return t.data_ptr()


class NativeFusedEngine(FusedEngine):
    """`FusedEngine` in bf16 with its elementwise work and weight updates in native kernels."""

    kernels = "native"

    def __init__(self, shape: ModelShape, lib: ctypes.CDLL, pad_id: int | None = PAD_ID):
        super().__init__(shape, pad_id, "bf16")
        self.lib = lib
        gh = shape.gates * shape.hidden_dim
        self.w_rT = torch.empty(gh, shape.proj_dim)  # w_r transposed: the backward's operand
        self._pad = -1 if pad_id is None else int(pad_id)

    def _shapes(self, t: int, b: int) -> dict[str, tuple[int, ...]]:
        gh = self.shape.gates * self.shape.hidden_dim
        return super()._shapes(t, b) | {"zr": (b, gh), "gbias": (gh,)}

    def _low_shapes(self, t: int, b: int) -> dict[str, tuple[int, ...]]:
        s = self.shape
        return super()._low_shapes(t, b) | {"outT": (s.proj_dim, t * b), "xT": (s.embed_dim, t * b)}

    def _views(self, t: int, b: int) -> _Views:
        v = super()._views(t, b)
        if not hasattr(v, "lgT"):  # checked once per shape: the kernels trust every stride
            v.lgT = v.lo["logits"].view(self.shape.vocab_total, t * b)
            passed = [*v.buf.values(), *(x for step in v.forward for x in step[5:9]), v.z[0], v.m[0]]
            if not all(x.is_contiguous() for x in passed):
                raise RuntimeError("NativeFusedEngine: a buffer the kernels read is not contiguous")
        return v

    def train_device(
        self, params: np.ndarray, tokens: np.ndarray, sgd: LocalSGD, rng: np.random.Generator
    ) -> tuple[np.ndarray, float]:
        """`FusedEngine.train_device`, with a diverged device's loss made NaN as in PyTorch.

        The kernels assume finite values (they compile with -ffast-math and clamp their
        exponentials), so a device whose weights went to inf or NaN can still report a finite
        loss. The run's divergence guard reads the loss, so it is NaN whenever the weights are
        not all finite (their sum, 0.2 ms, is finite exactly then, short of an overflow that is a
        divergence too). Such an update is refused by the shard either way: it is not finite."""
        delta, loss = super().train_device(params, tokens, sgd, rng)
        return delta, loss if math.isfinite(float(self.flat.sum())) else math.nan

    def _refresh_low(self) -> None:
        """At a device's start: the bf16 copies and w_r^T from the fp32 masters it was given."""
        w, lo, update = self.w, self.w_lo, self.lib.update
        for name in ("embedding", "w_x"):
            update(w[name].numel(), _p(w[name]), None, 0.0, _p(lo[name]))
        self.w_rT.copy_(w["w_r"].t())

    def _step(self, inp: torch.Tensor, target: torch.Tensor, b: int, lr: float) -> tuple[float, int]:
        return super()._step(inp.contiguous(), target.contiguous(), b, lr)

    def _forward(self, v: _Views, inp: torch.Tensor) -> None:
        w, lo, lib = self.w, v.lo, self.lib
        torch.index_select(self.w_lo["embedding"], 0, inp, out=lo["x"])
        torch.mm(lo["x"], self.w_lo["w_x"], out=lo["z"])
        v.c[0].zero_()
        v.r[0].zero_()
        t, b, _ = v.z.shape
        hd, gates = self.shape.hidden_dim, self.shape.gates
        zlo, zr, w_r, w_p, bias = lo["z"].view(t, b, -1), v.buf["zr"], w["w_r"], w["w_p"], _p(w["bias"])
        for s, (zs, *_, c0, c1, tc, h, r0, r1) in enumerate(v.forward):
            if r0 is not None:
                torch.mm(r0, w_r, out=zr)
            rec = _p(zr) if r0 is not None else None
            lib.cell_forward(b, hd, gates, _p(zlo[s]), bias, rec, _p(zs), _p(c0), _p(c1), _p(tc), _p(h))
            torch.mm(h, w_p, out=r1)

    def _output_layer(
        self, v: _Views, target: torch.Tensor, pad_rows: torch.Tensor | None, n: int, lr: float
    ) -> float:
        """Logits transposed (vocabulary x tokens), softmax cross-entropy down the columns in
        place, dr = d loss / d r and the embedding's output-layer step. Pads are the kernel's."""
        lo, emb, emb_lo = v.lo, self.w["embedding"], self.w_lo["embedding"]
        lo["out"].copy_(v.out)
        lo["outT"].copy_(lo["out"].t())
        torch.mm(emb_lo, lo["outT"], out=v.lgT)
        nll = self.lib.softmax_xent_cols(*v.lgT.shape, _p(v.lgT), _p(target), self._pad)
        torch.mm(v.lgT.t(), emb_lo, out=lo["dr"])
        torch.mul(lo["dr"], 1.0 / n, out=v.dr2)
        torch.mm(v.lgT, lo["out"], out=lo["g_emb"])
        self.lib.update(emb.numel(), _p(emb), _p(lo["g_emb"]), -lr / n, _p(emb_lo))
        return float(nll)

    def _backward_through_time(self, v: _Views, inp: torch.Tensor, lr: float) -> None:
        w, lo, lib = self.w, v.lo, self.lib
        t, b, _ = v.z.shape
        hd, gates = self.shape.hidden_dim, self.shape.gates
        dh, dc, gbias = v.dh, v.dc, v.buf["gbias"]
        dc.zero_()
        gbias.zero_()
        zlo, w_p_t = lo["z"].view(t, b, -1), w["w_p"].t()
        for k, (dr, m1, *_) in enumerate(v.backward):
            s = t - 1 - k
            if m1 is not None:
                dr.addmm_(m1, self.w_rT)
            torch.mm(dr, w_p_t, out=dh)
            args = (_p(dh), _p(v.z[s]), _p(v.c[s]), _p(v.tc[s]), _p(dc), _p(v.m[s]), _p(zlo[s]))
            lib.cell_backward(b, hd, gates, *args, _p(gbias))
        w["w_p"].addmm_(v.h2.t(), v.dr2, alpha=-lr)
        if t > 1:  # w_r's gradient pairs r_{s-1} (columns of out^T before the last step) with dz_s
            torch.mm(lo["outT"][:, : (t - 1) * b], lo["z"][b:], out=lo["g_r"])
            lib.update(w["w_r"].numel(), _p(w["w_r"]), _p(lo["g_r"]), -lr, None)
            self.w_rT.copy_(w["w_r"].t())
        torch.mm(lo["z"], self.w_lo["w_x"].t(), out=lo["dx"])
        lo["xT"].copy_(lo["x"].t())
        torch.mm(lo["xT"], lo["z"], out=lo["g_x"])
        lib.update(w["w_x"].numel(), _p(w["w_x"]), _p(lo["g_x"]), -lr, _p(self.w_lo["w_x"]))
        w["bias"].sub_(gbias, alpha=lr)
        # The ids index the embedding unchecked here: `check_inputs` refused any outside the vocabulary.
        emb, e = w["embedding"], self.shape.embed_dim
        lib.scatter_add_rows(len(inp), _p(inp), e, -lr, _p(lo["dx"]), _p(emb), _p(self.w_lo["embedding"]))
