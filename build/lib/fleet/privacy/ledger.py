"""The privacy ledger: an append-only record of every released round, committed before its output.

The mechanism appends a round's entry (and fsyncs it) before the round's metrics line leaves the
coordinator, so every round whose output anyone saw is accounted, also across a crash: a round
released after the last checkpoint and re-run on resume is two releases in secure mode (fresh
cohort, fresh noise) and both stay in the ledger. In reproducible mode the re-run draws the same
cohort and noise from the seed and releases the same output: it is matched against its entry,
which stays (a resumed run that stops before re-running it still accounts it).

RUN_DIR/state/ledger.jsonl, one JSON object per line: the fields of the mechanism's entry
(`fleet.privacy.sampled.SampledRelease` for DP-FedAvg, `fleet.privacy.tree_accountant.TreeRelease`
for DP-FTRL). It names no device. `fleet-privacy --run RUN_DIR` recomputes the epsilon from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleet.config import ConfigError

LEDGER_FILE = "ledger.jsonl"

Parse = Callable[[dict], Any]


class Ledger:
    """Releases in order; persisted to `path` when given (in-process tests may keep it in memory).
    `parse` turns a stored line into the mechanism's entry."""

    def __init__(self, path: Path | None, parse: Parse):
        self.path = Path(path) if path is not None else None
        self.parse = parse
        self.releases: list[Any] = read(self.path, parse) if self.path is not None else []
        if self.path is not None and self.path.exists() and _torn(self.path):
            self._rewrite()  # a crash mid-line: cut it, or the next append would be glued to it

    def append(self, release: Any) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(release.to_json(), sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.releases.append(release)

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in self.releases))
        os.replace(tmp, self.path)


def read(path: Path, parse: Parse) -> list[Any]:
    """The releases in a ledger file ([] if there is none). A torn last line (a crash while it was
    written, before the round's output left) is not a release; a bad line before others is a
    damaged ledger, refused: dropping it and what follows would under-account."""
    if not path.exists():
        return []
    out = []
    lines = path.read_text().split("\n")
    for i, text in enumerate(lines):
        if not text:
            continue
        try:
            out.append(parse(json.loads(text)))
        except (json.JSONDecodeError, TypeError, KeyError):
            if any(rest for rest in lines[i + 1 :]):
                where = f"{str(path)!r} line {i + 1}"
                raise ConfigError(f"resume: the ledger {where} is damaged and releases follow it") from None
            break
    return out


def _torn(path: Path) -> bool:
    """Whether the file ends in an incomplete line."""
    data = path.read_bytes()
    return bool(data) and not data.endswith(b"\n")
