"""The batched GPU engine: devices trained in lockstep as rows of stacked weights."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np
import torch
from torch.nn import functional

from fleet.learning.engines.common import LocalSGD, batches, check_inputs
from fleet.learning.model import PAD_ID, ModelShape

log = logging.getLogger(__name__)


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
        precision: str = "fp32",
    ):
        if group < 1:
            raise ValueError(f"model.batch_devices: must be >= 1 (got {group})")
        self.shape = shape
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.group = group
        self.precision = precision
        self._slices = shape.param_slices()
        if deterministic and self.device.type == "cuda":
            # Reproducible mode promises the same model run after run (and across a resume). On
            # CUDA the embedding's gradient accumulates with atomics in a varying order unless
            # PyTorch uses its deterministic kernels, and cuBLAS needs a fixed workspace for its
            # own; both must be set before this process first touches the GPU.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)

    def train_device(
        self, params: np.ndarray, tokens: np.ndarray, sgd: LocalSGD, rng: np.random.Generator
    ) -> tuple[np.ndarray, float]:
        return next(self.train_devices(params, [(tokens, rng)], sgd))

    def train_devices(
        self, params: np.ndarray, jobs: Iterable[tuple[np.ndarray, np.random.Generator]], sgd: LocalSGD
    ) -> Iterator[tuple[np.ndarray, float]]:
        jobs = iter(jobs)
        base = None
        while chunk := list(islice(jobs, self.group)):
            for tokens, _ in chunk:
                check_inputs(params, tokens, self.shape)
            if base is None:
                base = torch.from_numpy(np.array(params, dtype=np.float32)).to(self.device)
            deltas, losses = self._train_group(base, chunk, sgd)
            yield from zip(deltas, losses, strict=True)

    def _train_group(
        self, base: torch.Tensor, chunk: list[tuple[np.ndarray, np.random.Generator]], sgd: LocalSGD
    ) -> tuple[np.ndarray, list[float]]:
        epochs, batch_size, lr = sgd
        width = {tokens.shape[1] for tokens, _ in chunk}
        if len(width) != 1:
            raise ValueError(f"tokens: every device of a group needs the same sequence length, got {width}")
        steps = [batches(len(tokens), epochs, batch_size, order) for tokens, order in chunk]
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
            # bf16: autocast runs the matmuls in bf16 and keeps the loss in fp32; the weights
            # (`flat`) and so their gradients and the update stay fp32.
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
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
