"""The next-word-prediction model: a tied-embedding CIFG-LSTM with a projection (Hard et al. 2018).

Architecture, and the choices made where the paper is silent:

- Input and output embeddings are one matrix `embedding` (vocab_total x embed_dim): tokens are
  looked up in it, and the logits are `r_t @ embedding.T` with no output bias. Tying needs the
  recurrent output to have the embedding's width, so `proj_dim` must equal `embed_dim`; a
  mismatch is refused rather than patched with an extra layer, because the paper's model (and
  every config here) ties them directly, and an extra layer would be a different model.
- One recurrent layer of `hidden_dim` units whose output h_t = o * tanh(c_t) is projected to
  r_t = h_t @ w_p (no bias, as `torch.nn.LSTM(proj_size=...)`); r_t feeds back as the
  recurrent input and produces the logits.
- `cell="cifg"` couples the input and forget gates, f = 1 - i, so the cell has three gate
  blocks (o, i, g) instead of four (o, i, f, g); no peepholes.
- Gate pre-activations are x_t @ w_x + r_{t-1} @ w_r + bias, with all gates side by side in one
  matrix. The gate order puts o first and the candidate g last: the sigmoid gates are then one
  contiguous block (their derivative s (1 - s) is one pass), and the gates whose gradient is
  scaled by dc (i, f, g) are one contiguous block (see `fleet.learning.engines.FusedEngine`).
- Initialisation: embedding U(-init_scale, init_scale); w_x, w_r, w_p U(-1/sqrt(H), 1/sqrt(H))
  as PyTorch's LSTM; biases 0.
- Weights are stored as (in, out), so every layer is `x @ w`.

The flat parameter vector (`get_flat`) is the concatenation, in this order, of embedding, w_x,
w_r, bias, w_p, each row-major: the round, the clipping and the engines all rely on that order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from fleet.config import ModelConfig
from fleet.learning.data.vocab import NUM_SPECIAL, PAD

# The id space is fleet.learning.data.vocab's (pad=0, bos=1, eos=2, oov=3, words from 4); named here for
# the model's use: the vocabulary gains SPECIAL_TOKENS ids, targets equal to PAD_ID are not losses.
SPECIAL_TOKENS = NUM_SPECIAL
PAD_ID = PAD

CELLS = {"cifg": 3, "lstm": 4}  # cell -> number of gate blocks


@dataclass(frozen=True)
class ModelShape:
    """The sizes that define the model; engines and FLOP counts need only this, not the weights."""

    vocab_total: int
    embed_dim: int
    hidden_dim: int
    proj_dim: int
    cell: str = "cifg"

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"model.cell: unknown value {self.cell!r}; expected one of {', '.join(CELLS)}")
        if self.proj_dim != self.embed_dim:
            raise ValueError(
                f"model.proj_dim: must equal model.embed_dim for tied embeddings "
                f"({self.proj_dim} != {self.embed_dim})"
            )
        for name in ("vocab_total", "embed_dim", "hidden_dim", "proj_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}: must be >= 1 (got {getattr(self, name)})")

    @classmethod
    def from_config(cls, mcfg: ModelConfig) -> ModelShape:
        """The shape of `fleet.config.ModelConfig`; the special tokens are added to the vocabulary."""
        return cls(
            vocab_total=int(mcfg.vocab_size) + SPECIAL_TOKENS,
            embed_dim=int(mcfg.embed_dim),
            hidden_dim=int(mcfg.hidden_dim),
            proj_dim=int(mcfg.proj_dim),
            cell=str(mcfg.cell),
        )

    @property
    def gates(self) -> int:
        return CELLS[self.cell]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter, in flat-vector order."""
        gh = self.gates * self.hidden_dim
        return {
            "embedding": (self.vocab_total, self.embed_dim),
            "w_x": (self.embed_dim, gh),
            "w_r": (self.proj_dim, gh),
            "bias": (gh,),
            "w_p": (self.hidden_dim, self.proj_dim),
        }

    def param_slices(self) -> dict[str, tuple[slice, tuple[int, ...]]]:
        """Name -> (its slice of the flat vector, its shape): how engines view one flat buffer."""
        out, offset = {}, 0
        for name, s in self.param_shapes().items():
            n = math.prod(s)
            out[name] = (slice(offset, offset + n), s)
            offset += n
        return out

    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    def matmul_macs_per_token(self) -> int:
        """Multiply-adds of the forward pass per token: cell gates, projection, output layer.

        The embedding lookup and the elementwise gate math are left out: they are memory traffic,
        not FLOPs, and are a few percent of the total at every size that matters.
        """
        gh = self.gates * self.hidden_dim
        return (
            gh * (self.embed_dim + self.proj_dim)
            + self.hidden_dim * self.proj_dim
            + self.proj_dim * self.vocab_total
        )


class Gates(NamedTuple):
    """Post-activation gates of one step, each (batch, hidden_dim); for CIFG, f is 1 - i."""

    i: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    o: torch.Tensor


class NWPModel(nn.Module):
    """Tied-embedding LSTM/CIFG language model; eager and plain, the ground truth engines match."""

    def __init__(
        self,
        vocab_total: int,
        embed_dim: int,
        hidden_dim: int,
        proj_dim: int,
        cell: str = "cifg",
        init_scale: float = 0.1,
    ):
        super().__init__()
        self.shape = ModelShape(vocab_total, embed_dim, hidden_dim, proj_dim, cell)
        shapes = self.shape.param_shapes()
        self.embedding = nn.Parameter(torch.empty(shapes["embedding"]))
        self.w_x = nn.Parameter(torch.empty(shapes["w_x"]))
        self.w_r = nn.Parameter(torch.empty(shapes["w_r"]))
        self.bias = nn.Parameter(torch.zeros(shapes["bias"]))
        self.w_p = nn.Parameter(torch.empty(shapes["w_p"]))
        # Embedding U(-s, s) as in the W1 workload; the cell and projection use PyTorch's LSTM
        # default U(-1/sqrt(H), 1/sqrt(H)), which keeps gate pre-activations O(1) at any width.
        nn.init.uniform_(self.embedding, -init_scale, init_scale)
        bound = 1.0 / math.sqrt(hidden_dim)
        for w in (self.w_x, self.w_r, self.w_p):
            nn.init.uniform_(w, -bound, bound)

    def cell(
        self, gx_t: torch.Tensor, r: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Gates]:
        """One recurrent step from the input part of the gates; returns (r_t, c_t, gates)."""
        hd = self.shape.hidden_dim
        z = gx_t + r @ self.w_r
        o = torch.sigmoid(z[:, :hd])
        i = torch.sigmoid(z[:, hd : 2 * hd])
        if self.shape.cell == "cifg":
            f = 1.0 - i
        else:
            f = torch.sigmoid(z[:, 2 * hd : 3 * hd])
        g = torch.tanh(z[:, -hd:])
        c = f * c + i * g
        h = o * torch.tanh(c)
        return h @ self.w_p, c, Gates(i, f, g, o)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (batch, time, vocab_total) of the next token after each input token."""
        b, t = tokens.shape
        gx = nn.functional.embedding(tokens, self.embedding) @ self.w_x + self.bias
        r = gx.new_zeros(b, self.shape.proj_dim)
        c = gx.new_zeros(b, self.shape.hidden_dim)
        outs = []
        for step in range(t):
            r, c, _ = self.cell(gx[:, step], r, c)
            outs.append(r)
        return torch.stack(outs, dim=1) @ self.embedding.t()


def build_model(mcfg: ModelConfig) -> NWPModel:
    """The model of a `fleet.config.ModelConfig` (its vocabulary plus the special tokens)."""
    s = ModelShape.from_config(mcfg)
    return NWPModel(s.vocab_total, s.embed_dim, s.hidden_dim, s.proj_dim, s.cell, float(mcfg.init_scale))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def get_flat(model: nn.Module) -> np.ndarray:
    """All parameters as one float32 vector, in registration (= `ModelShape.param_shapes`) order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(torch.float32).numpy()


def set_flat(model: nn.Module, flat: np.ndarray) -> None:
    """Load a vector written by `get_flat` (or produced by the round) into the model, in place."""
    flat = np.asarray(flat, dtype=np.float32)
    if flat.shape != (param_count(model),):
        raise ValueError(f"set_flat: expected {param_count(model)} values, got shape {flat.shape}")
    offset = 0
    for p in model.parameters():
        n = p.numel()
        # Copied on the numpy side: `flat` may be read-only (a Ray object-store broadcast),
        # which torch.from_numpy warns about.
        p.detach().numpy()[...] = flat[offset : offset + n].reshape(p.shape)
        offset += n


def flops_per_example(mcfg: ModelConfig) -> float:
    """Training FLOPs of one sequence: forward + backward = 3 x forward, 2 FLOPs a multiply-add."""
    return 6.0 * mcfg.seq_len * ModelShape.from_config(mcfg).matmul_macs_per_token()


def job_flops(mcfg: ModelConfig, num_examples: np.ndarray, epochs: int) -> np.ndarray:
    """FLOPs of each device's local job (float64, one per device): what the timing model divides."""
    return flops_per_example(mcfg) * float(epochs) * np.asarray(num_examples, dtype=np.float64)


def model_bytes(mcfg: ModelConfig) -> int:
    """Bytes of the float32 weights: the download size, and the upload size of a dense update."""
    return 4 * ModelShape.from_config(mcfg).num_params()
