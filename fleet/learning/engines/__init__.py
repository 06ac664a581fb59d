"""Local training: E epochs of minibatch SGD on one device's examples, from the broadcast weights.

Three engines with one contract (`Engine.train_device`, and `Engine.train_devices` for a cohort):

- `ReferenceEngine`: the eager `NWPModel`, `loss.backward()` and a manual SGD step. Slow and
  obviously right; tests hold every other engine to its deltas.
- `FusedEngine`: the fast CPU engine. On CPU, devices are trained one after another (docs/ARCHITECTURE.md,
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
  it is slower than the fused engine at Gboard size (docs/ARCHITECTURE.md, step 4), so `auto` picks it only
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

import torch

from fleet.config import ConfigError, ModelConfig
from fleet.learning.engines import native
from fleet.learning.engines.batched import BatchedEngine
from fleet.learning.engines.common import Engine, LocalSGD
from fleet.learning.engines.fused import FusedEngine
from fleet.learning.engines.fused_native import NativeFusedEngine
from fleet.learning.engines.reference import ReferenceEngine
from fleet.learning.model import PAD_ID, ModelShape

log = logging.getLogger(__name__)


ENGINES = ("auto", "fused", "reference", "batched")
PRECISIONS = ("auto", "fp32", "bf16")
# `auto` picks bf16 only for a model whose output layer (vocabulary x embedding, the GEMMs that
# dominate a step) has at least this many weights: the gboard model (10,004 x 96) trains 1.5x
# faster in bf16 on PyTorch's ops and about 1.9x on the native kernels. Smaller models gain less
# (the default job's cifg_small, 1,004 x 32: 1.08x on PyTorch's ops, 1.37x native, measured on
# the AMX machine; 7% slower on PyTorch's ops on an earlier one), and below the line `auto` keeps
# fp32 so that the default job's figures stay fp32, reproducible to the last digit.
BF16_MIN_OUTPUT_WEIGHTS = 2**19


def bf16_supported(device: str) -> bool:
    """Whether `device` does bf16 matmuls natively (a CPU with AVX512-BF16 or AMX, a GPU with
    bf16 tensor cores); elsewhere PyTorch emulates them, slower than fp32."""
    if device.startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(mcfg: ModelConfig, device: str, engine: str) -> str:
    """The precision local training runs in: `model.precision`, or with "auto" bf16 where the
    device has native bf16 and the model is large enough to gain (BF16_MIN_OUTPUT_WEIGHTS), fp32
    otherwise. The reference engine is fp32 whatever is asked: it is what the others are held to."""
    want = str(mcfg.precision)
    if want not in PRECISIONS:
        raise ConfigError(f"model.precision: unknown value {want!r}; expected one of {', '.join(PRECISIONS)}")
    if engine == "reference":
        if want == "bf16":
            raise ConfigError("model.precision: bf16 needs model.engine=auto, fused or batched")
        return "fp32"
    if want != "auto":
        return want
    shape = ModelShape.from_config(mcfg)
    big = shape.vocab_total * shape.embed_dim >= BF16_MIN_OUTPUT_WEIGHTS
    return "bf16" if big and bf16_supported(device) else "fp32"


def resolve_device(mcfg: ModelConfig, gpus: float = 0.0, engine: str = "auto") -> str:
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
    mcfg: ModelConfig,
    name: str = "auto",
    pad_id: int | None = PAD_ID,
    gpus: float = 0.0,
    deterministic: bool = True,
) -> Engine:
    """The engine for a `fleet.config.ModelConfig`: "auto" is the batched engine on a GPU and the
    fused engine (the fastest on CPU) otherwise, in the precision `resolve_precision` picks.
    `gpus` is what the calling shard was given; `deterministic` (reproducible mode) asks a GPU for
    its deterministic kernels.

    `pad_id=None` counts every target (the W1 benchmark, whose token ids are all words).
    """
    shape = ModelShape.from_config(mcfg)
    if name not in ENGINES:
        raise ConfigError(f"model.engine: unknown value {name!r}; expected one of {', '.join(ENGINES)}")
    device = resolve_device(mcfg, gpus, name)
    precision = resolve_precision(mcfg, device, name)
    if str(mcfg.kernels) == "native" and (name in ("batched", "reference") or device != "cpu"):
        raise ConfigError(
            "model.kernels=native: the native kernels are the fused CPU engine's bf16 mode's, and "
            f"this model trains on the {'batched' if name == 'auto' else name} engine on {device}; "
            "use model.kernels=auto"
        )
    if name == "batched" or (name == "auto" and device != "cpu"):
        return BatchedEngine(shape, pad_id, device, int(mcfg.batch_devices), deterministic, precision)
    if device != "cpu":
        raise ConfigError(f"model.engine: {name!r} runs on CPU only; use model.engine=batched on {device}")
    if name == "reference":
        return ReferenceEngine(shape, pad_id)
    if str(mcfg.kernels) == "native" and precision != "bf16":
        raise ConfigError(
            f"model.kernels=native: the native kernels are the fused engine's bf16 mode's, and this "
            f"model trains in {precision} (model.precision={mcfg.precision}); use model.kernels=auto"
        )
    if precision == "bf16" and str(mcfg.kernels) != "torch":
        lib = native.load()
        if lib is not None:
            return NativeFusedEngine(shape, lib, pad_id)
        if str(mcfg.kernels) == "native":
            raise ConfigError(f"model.kernels=native: {native.why_not()}; use model.kernels=auto or torch")
        engine = FusedEngine(shape, pad_id, precision)
        engine.native_unavailable = native.why_not()  # the start-up header says so
        return engine
    return FusedEngine(shape, pad_id, precision)


__all__ = [
    "ENGINES",
    "BatchedEngine",
    "Engine",
    "FusedEngine",
    "NativeFusedEngine",
    "LocalSGD",
    "PRECISIONS",
    "ReferenceEngine",
    "bf16_supported",
    "make_engine",
    "resolve_device",
    "resolve_precision",
]
