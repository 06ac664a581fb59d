"""Scoring canaries: log-perplexity, exposure by rank and by extrapolation, beam-search extraction."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from fleet.audits.memorization.plan import draw_words
from fleet.learning.data.vocab import BOS, NUM_SPECIAL

# Logit floats per forward pass when scoring candidates (128 MB, twice with the log-softmax):
# 4,096 five-word candidates of the Gboard-size vocabulary, 25,000 of the demo's.
SCORE_FLOATS = 1 << 25
_LN2 = math.log(2.0)


def _run(model: Any, tokens: Any, r: Any, c: Any) -> tuple[Any, Any, Any]:
    """Feed tokens (b, t) through the cell from state (r, c); outputs (b, t, proj) and the state."""
    import torch

    gx = torch.nn.functional.embedding(tokens, model.embedding) @ model.w_x + model.bias
    outs = []
    for step in range(tokens.shape[1]):
        r, c, _ = model.cell(gx[:, step], r, c)
        outs.append(r)
    return (torch.stack(outs, dim=1) if outs else gx.new_zeros(len(tokens), 0, r.shape[1])), r, c


def _context_state(model: Any, prefixes: np.ndarray) -> tuple[Any, Any]:
    """The state after [bos, prefix] for each row of prefixes (k, m): what predicts the secret."""
    import torch

    tokens = torch.from_numpy(np.concatenate([np.full((len(prefixes), 1), BOS), prefixes], axis=1))
    shape = model.shape
    r = torch.zeros(len(prefixes), shape.proj_dim)
    c = torch.zeros(len(prefixes), shape.hidden_dim)
    _, r, c = _run(model, tokens.long(), r, c)
    return r, c


def log_perplexity(
    model: Any, prefix: np.ndarray, secrets: np.ndarray, batch: int | None = None
) -> np.ndarray:
    """Bits: sum over each secret's words of -log2 P(word | bos, prefix, earlier words).

    `model` is an NWPModel; secrets (N, n) share one prefix (m,). The prefix is run once; each
    batch of secrets (default: `SCORE_FLOATS` logits) is one pass of n-1 cell steps from its
    state, one logits matmul over all positions and one gather: no Python per candidate.
    """
    import torch

    secrets = np.asarray(secrets)
    batch = batch or max(1, SCORE_FLOATS // (secrets.shape[1] * model.embedding.shape[0]))
    out = np.empty(len(secrets), dtype=np.float64)
    with torch.no_grad():
        r0, c0 = _context_state(model, np.asarray(prefix, dtype=np.int64)[None, :])
        for s in range(0, len(secrets), batch):
            sec = torch.from_numpy(np.ascontiguousarray(secrets[s : s + batch], dtype=np.int64))
            b = len(sec)
            r, c = r0.expand(b, -1), c0.expand(b, -1)
            outs, _, _ = _run(model, sec[:, :-1], r, c)
            states = torch.cat([r[:, None, :], outs], dim=1)  # predicts word j from words < j
            logp = torch.log_softmax(states @ model.embedding.t(), dim=-1)
            out[s : s + b] = -logp.gather(-1, sec[..., None])[..., 0].sum(1).double().numpy() / _LN2
    return out


def exposure_by_rank(canary: float, references: np.ndarray) -> tuple[int, float]:
    """(rank, exposure) of a canary's log-perplexity among R candidates' (|R| = R + 1)."""
    rank = 1 + int(np.count_nonzero(np.asarray(references) < canary))
    return rank, math.log2(len(references) + 1) - math.log2(rank)


def fit_skewnorm(samples: np.ndarray) -> tuple[float, float, float, float, float]:
    """Skew-normal fitted to candidates' log-perplexities: (shape, loc, scale) on standardised
    values and the (mean, std) used to standardise them (the fit is better conditioned there)."""
    from scipy import stats

    mu, sd = float(np.mean(samples)), float(np.std(samples)) or 1.0
    a, loc, scale = stats.skewnorm.fit((samples - mu) / sd)
    return float(a), float(loc), float(scale), mu, sd


def exposure_extrapolated(canary: float, fit: tuple[float, float, float, float, float]) -> float:
    """-log2 CDF of the fitted skew-normal at the canary's log-perplexity (log CDF: no underflow)."""
    from scipy import stats

    a, loc, scale, mu, sd = fit
    return float(-stats.skewnorm.logcdf((canary - mu) / sd, a, loc, scale) / _LN2)


def beam_search(model: Any, prefixes: np.ndarray, length: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The `width` most likely word sequences of `length` after each prefix, all prefixes at once.

    Only words are generated (a secret is words). Returns tokens (k, width, length), best
    first, and their log-probabilities (k, width) in bits.
    """
    import torch

    k = len(prefixes)
    emb = model.embedding
    words = emb.shape[0] - NUM_SPECIAL
    width = min(width, words)
    with torch.no_grad():
        r, c = _context_state(model, np.asarray(prefixes, dtype=np.int64))
        seqs = torch.zeros(k, width, 0, dtype=torch.long)
        score = torch.zeros(k, 1)
        for step in range(length):
            if step:
                gx = emb[seqs[:, :, -1].reshape(-1)] @ model.w_x + model.bias
                r, c, _ = model.cell(gx, r, c)
            logp = torch.log_softmax(r @ emb.t(), dim=-1)[:, NUM_SPECIAL:].reshape(k, -1, words)
            total = (score[:, :, None] + logp).reshape(k, -1)
            score, best = total.topk(width, dim=1)
            beam, word = best // words, best % words + NUM_SPECIAL
            seqs = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, step)), word[..., None]], dim=2)
            pick = (torch.arange(k)[:, None] * (r.shape[0] // k) + beam).reshape(-1)
            r, c = r[pick], c[pick]
    return seqs.numpy().astype(np.int32), score.double().numpy() / _LN2


def one_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` with PyTorch on one thread, restoring the caller's setting afterwards."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def secret_bits(secrets: np.ndarray, word_p: np.ndarray) -> np.ndarray:
    """-log2 of each secret's probability under the candidate distribution (words i.i.d. from
    word_p): the most exposure any canary can have, however the model ranks it.

    Exposure is -log2 P(a candidate scores at least as well as the canary), and the canary itself
    is a candidate with that probability, so no model can push it higher. A skew-normal fit has
    no such ceiling (a canary once came out 0.5 bits above it); this is where it is capped.
    """
    idx = np.asarray(secrets, dtype=np.int64) - NUM_SPECIAL
    return -np.log2(np.asarray(word_p, dtype=np.float64)[idx]).sum(axis=1)


def bootstrap_fits(candidates: np.ndarray, g: np.random.Generator, rounds: int) -> list[tuple]:
    """Skew-normals fitted to `rounds` bootstrap resamples of the candidates (one set per prefix,
    shared by all its canaries: the fits are the cost, about 0.1 s each)."""
    return [fit_skewnorm(g.choice(candidates, len(candidates))) for _ in range(rounds)]


def bootstrap_interval(canary: float, fits: list[tuple], cap: float) -> tuple[float, float]:
    """95% percentile interval of the capped extrapolated exposure over bootstrap fits: how far
    the figure moves with the candidate draw (3 bits, far out).

    It measures the draw only, not the skew-normal's misfit, which above about 12 bits tends to
    read LOW: on a privacy audit the unsafe direction, so reports quote the upper end there.
    """
    lo, hi = np.percentile([min(cap, exposure_extrapolated(canary, f)) for f in fits], [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_extrapolated(
    canary: float, candidates: np.ndarray, cap: float, g: np.random.Generator, rounds: int
) -> tuple[float, float]:
    """`bootstrap_interval` of one canary from fresh resamples of the candidates."""
    return bootstrap_interval(canary, bootstrap_fits(candidates, g, rounds), cap)


def generic_extraction(model: Any, prefixes: np.ndarray, secrets: np.ndarray, beam_width: int) -> np.ndarray:
    """Which canaries' secrets come out of beam search from prefixes that are not their own.

    A memorized secret that a generic context already brings up leaks without the attacker
    knowing its prefix. Returns, per canary, the number of the given prefixes whose top
    `beam_width` beams contain the secret.
    """
    if len(prefixes) == 0:
        return np.zeros(len(secrets), dtype=np.int64)
    beams, _ = beam_search(model, prefixes, secrets.shape[1], beam_width)
    flat = beams.reshape(-1, secrets.shape[1])
    hits = np.all(flat[None, :, :] == secrets[:, None, :], axis=2).reshape(len(secrets), len(prefixes), -1)
    return hits.any(axis=2).sum(axis=1).astype(np.int64)


@one_thread
def measure(
    model: Any,
    prefixes: np.ndarray,
    secrets: np.ndarray,
    word_p: np.ndarray,
    references: int,
    samples: int,
    beam_width: int,
    seed: int,
    bootstrap: int = 0,
    generic_prefixes: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Exposure and extraction of canaries (prefixes (k, m), secrets (k, n)) under a model.

    Candidates are fresh secrets drawn from `word_p` (as the canaries' were), one set shared by
    every prefix and scored once per distinct prefix: the first `references` rank each canary,
    the first `samples` fit the skew-normal. Returns per-canary arrays: log_perplexity (bits),
    rank, exposure, saturated (ranked first: exposure by rank is only a lower bound, log2|R|),
    exposure_extrapolated (capped at `secret_bits`, the candidate space's own maximum),
    exposure_cap, exposure_extrapolated_lo/hi (bootstrap interval with `bootstrap` resamples,
    for saturated canaries only, where the extrapolation is the figure; NaN elsewhere),
    extracted (top beam is the secret), extracted_top_b (the secret is among the `beam_width`
    beams), top_beam (its words) and generic_hits (how many of `generic_prefixes` bring the
    secret up in their top beams).

    Runs on one thread: the batches are narrow matmuls and elementwise gate math, where a second
    thread gains little and, on a busy 2-core machine, was measured to make scoring 65,536
    candidates 15x slower (23 s against 1.6 s).
    """
    g = np.random.default_rng(seed)
    candidates = draw_words(g, word_p, (max(references, samples), secrets.shape[1]))
    out = _exposures(model, prefixes, secrets, word_p, candidates, references, samples, g, bootstrap)
    out["saturated"] = out["rank"] == 1
    out.update(_extraction(model, prefixes, secrets, beam_width, generic_prefixes))
    return out


def _exposures(
    model: Any,
    prefixes: np.ndarray,
    secrets: np.ndarray,
    word_p: np.ndarray,
    candidates: np.ndarray,
    references: int,
    samples: int,
    g: np.random.Generator,
    bootstrap: int,
) -> dict[str, np.ndarray]:
    """`measure`'s exposure arrays: the candidates are scored once per distinct prefix and shared
    by its canaries, the bootstrap fits (drawn from `g` after the candidates, in prefix order)
    made only for a prefix with a saturated canary."""
    k = len(secrets)
    cap = secret_bits(secrets, word_p)
    out = {
        "log_perplexity": np.zeros(k),
        "rank": np.zeros(k, dtype=np.int64),
        "exposure": np.zeros(k),
        "exposure_extrapolated": np.zeros(k),
        "exposure_cap": cap,
        "exposure_extrapolated_lo": np.full(k, np.nan),
        "exposure_extrapolated_hi": np.full(k, np.nan),
    }
    unique, which = np.unique(prefixes, axis=0, return_inverse=True)
    which = np.asarray(which).reshape(-1)
    for u, prefix in enumerate(unique):
        mine = np.flatnonzero(which == u)
        cand = log_perplexity(model, prefix, candidates)
        fit = fit_skewnorm(cand[:samples])
        out["log_perplexity"][mine] = log_perplexity(model, prefix, secrets[mine])
        fits = None  # bootstrap fits of this prefix's candidates, made when first needed
        for c in mine:
            lp = out["log_perplexity"][c]
            out["rank"][c], out["exposure"][c] = exposure_by_rank(lp, cand[:references])
            out["exposure_extrapolated"][c] = min(cap[c], exposure_extrapolated(lp, fit))
            if bootstrap and out["rank"][c] == 1:
                fits = fits or bootstrap_fits(cand[:samples], g, bootstrap)
                lo_hi = bootstrap_interval(lp, fits, cap[c])
                out["exposure_extrapolated_lo"][c], out["exposure_extrapolated_hi"][c] = lo_hi
    return out


def _extraction(
    model: Any,
    prefixes: np.ndarray,
    secrets: np.ndarray,
    beam_width: int,
    generic_prefixes: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """`measure`'s extraction arrays: whether beam search from each canary's own prefix brings up
    its secret (top beam, any of the `beam_width`), and how many generic prefixes do."""
    beams, _ = beam_search(model, prefixes, secrets.shape[1], beam_width)
    generic = (
        np.zeros((0, prefixes.shape[1]), dtype=np.int32) if generic_prefixes is None else generic_prefixes
    )
    return {
        "extracted": np.all(beams[:, 0] == secrets, axis=1),
        "extracted_top_b": np.any(np.all(beams == secrets[:, None, :], axis=2), axis=1),
        "top_beam": beams[:, 0],
        "generic_hits": generic_extraction(model, generic, secrets, beam_width),
    }
