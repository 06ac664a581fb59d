"""Checkpoints and exact resume; the shards' crash journal.

A checkpoint is two kinds of file under RUN_DIR/state/, written atomically (temporary + rename):
- `shard_{start}_{stop}.npz`, written by each shard: its per-device participation state and the
  availability model's state, as arrays aligned to row index (no device ids). Per-device state
  stays with the shards' files, apart from the coordinator's (docs/ARCHITECTURE.md, invariant 3);
- `coordinator.pt`, written last, which commits the checkpoint: round counter, simulated clock,
  incident counts, and the mechanism's state (the released model under `model`, its server
  optimizer or tree, its accountant, the clip norm). It holds no device id.
All randomness is keyed by (seed, round, device), so the round counter is the whole RNG state.

Each shard appends the rows it counted in every round to a journal (fsynced), each record with a
sequence number; a shard checkpoint records the last sequence number it includes. A shard that
comes back (a crash, a resume) loads its newest checkpoint and replays the records after it,
whatever round they belong to: a checkpoint the coordinator never committed (a crash between the
shards' files and its own), or rounds re-run after a secure resume with round numbers below the
shards' newest file, lose nothing. Records are dropped from the journal only once a committed
checkpoint includes them.
"""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from fleet.atomic import atomic_write_bytes
from fleet.config import ConfigError

STATE_DIR = "state"
COORDINATOR_FILE = "coordinator.pt"
CONFIG_FILE = "config.json"
_HEADER = struct.Struct("<qqqdq")  # sequence number, round, release index, time, number of rows


def journal_file(state_dir: Path, start: int, stop: int) -> Path:
    return state_dir / f"journal_{start}_{stop}.bin"


def _shard_files(state_dir: Path, start: int, stop: int) -> dict[int, Path]:
    """Checkpoint files of one shard range by round."""
    out = {}
    for p in state_dir.glob(f"shard_{start}_{stop}_r*.npz"):
        out[int(p.stem.rsplit("_r", 1)[1])] = p
    return out


def save_shard(state_dir: Path, start: int, stop: int, round_idx: int, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, round=np.int64(round_idx), **arrays)
    atomic_write_bytes(state_dir / f"shard_{start}_{stop}_r{round_idx}.npz", buf.getvalue())


def prune_shard(state_dir: Path, start: int, stop: int, keep_round: int) -> None:
    """Delete a shard's checkpoints older than the one the coordinator has committed."""
    for r, p in _shard_files(state_dir, start, stop).items():
        if r < keep_round:
            p.unlink(missing_ok=True)


def drop_shards_after(state_dir: Path, start: int, stop: int, round_idx: int) -> None:
    """Delete a shard's checkpoints of rounds after `round_idx`: a future that was lost (a resume
    goes back before it) or superseded (a newer save covers everything they held)."""
    for r, p in _shard_files(state_dir, start, stop).items():
        if r > round_idx:
            p.unlink(missing_ok=True)


def load_shard(
    state_dir: Path, start: int, stop: int, upto_round: int | None
) -> dict[str, np.ndarray] | None:
    """The newest checkpoint of a shard range taken at or before `upto_round` (None: the newest)."""
    files = {
        r: p for r, p in _shard_files(state_dir, start, stop).items() if upto_round is None or r <= upto_round
    }
    if not files:
        return None
    try:
        with np.load(files[max(files)]) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # a corrupt shard checkpoint: say which file, in one line
        raise ConfigError(f"resume: cannot read the checkpoint {str(files[max(files)])!r}: {e}") from None


JournalRecord = tuple[int, int, int, float, np.ndarray]  # sequence, round, release index, time, rows


def append_journal(state_dir: Path, start: int, stop: int, record: JournalRecord) -> None:
    """Record the rows counted in a round (appended and fsynced before the shard answers: the
    ledger is fsynced too, so no released round can outlive the record of who took part in it)."""
    seq, round_idx, release, t, rows = record
    rows = np.asarray(rows, dtype=np.int64)
    with open(journal_file(state_dir, start, stop), "ab") as f:
        f.write(_HEADER.pack(seq, round_idx, release, t, len(rows)) + rows.tobytes())
        f.flush()
        os.fsync(f.fileno())


def read_journal(state_dir: Path, start: int, stop: int) -> list[JournalRecord]:
    path = journal_file(state_dir, start, stop)
    if not path.exists():
        return []
    data = path.read_bytes()
    out, pos = [], 0
    while pos + _HEADER.size <= len(data):
        seq, r, release, t, n = _HEADER.unpack_from(data, pos)
        pos += _HEADER.size
        if pos + 8 * n > len(data):
            break  # a torn last record: the crash happened while writing it; that round was not released
        out.append((seq, r, release, t, np.frombuffer(data, dtype=np.int64, count=n, offset=pos).copy()))
        pos += 8 * n
    return out


def write_journal(state_dir: Path, start: int, stop: int, records: list[JournalRecord]) -> None:
    """Replace the journal (after a restore: without a torn tail; after a commit: without what the
    committed checkpoint holds)."""
    data = b"".join(
        _HEADER.pack(seq, r, rel, t, len(rows)) + np.asarray(rows, dtype=np.int64).tobytes()
        for seq, r, rel, t, rows in records
    )
    atomic_write_bytes(journal_file(state_dir, start, stop), data)


def save_coordinator(state_dir: Path, state: dict[str, Any]) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(state_dir / COORDINATOR_FILE, buf.getvalue())


def load_coordinator(state_dir: Path) -> dict[str, Any] | None:
    import torch

    path = state_dir / COORDINATOR_FILE
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # truncated, overwritten or not a checkpoint at all
        raise ConfigError(
            f"resume: cannot read the checkpoint {str(path)!r} ({type(e).__name__}): {e}"
        ) from None


def released_model(state: dict[str, Any]) -> np.ndarray:
    """The model a checkpoint's mechanism released (what evaluation and every audit read), float32.
    The mechanism writes it under one key whatever its kind: an FTRL run's server optimizer never
    steps, so reading the optimizer's weights would score the initial model."""
    return np.asarray(state["mechanism"]["model"], dtype=np.float32)


def save_config(run_dir: Path, config: dict) -> None:
    atomic_write_bytes(run_dir / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode())


def load_run_config(run_dir: str | Path) -> dict:
    """The config a run was started with; a one-line error if RUN_DIR is not a fleet run."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise ConfigError(f"resume: {str(run_dir)!r} is not a directory")
    if not path.exists() or not (run_dir / STATE_DIR / COORDINATOR_FILE).exists():
        raise ConfigError(f"resume: {str(run_dir)!r} is not a fleet run with a checkpoint")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"resume: cannot read {str(path)!r}: {e}") from None
