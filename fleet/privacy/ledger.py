"""The privacy ledger: an append-only record of every released round, committed before its output.

The mechanism appends a round's entry (and fsyncs it) before the round's metrics line leaves the
coordinator, so every round whose output anyone saw is accounted, also across a crash: a round
released after the last checkpoint and re-run on resume is two releases in secure mode (fresh
cohort, fresh noise) and both stay in the ledger. In reproducible mode the re-run draws the same
cohort and noise from the seed, releases the same output, and replaces its entry.

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

LEDGER_FILE = "ledger.jsonl"

Parse = Callable[[dict], Any]


class Ledger:
    """Releases in order; persisted to `path` when given (in-process tests may keep it in memory).
    `parse` turns a stored line into the mechanism's entry."""

    def __init__(self, path: Path | None, parse: Parse):
        self.path = Path(path) if path is not None else None
        self.parse = parse
        self.releases: list[Any] = read(self.path, parse) if self.path is not None else []

    def append(self, release: Any) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(release.to_json(), sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.releases.append(release)

    def truncate(self, keep: int) -> None:
        """Keep the first `keep` releases (reproducible resume: later rounds are re-run and release
        the same outputs again)."""
        self.releases = self.releases[:keep]
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in self.releases))
            os.replace(tmp, self.path)


def read(path: Path, parse: Parse) -> list[Any]:
    """The releases in a ledger file ([] if there is none); a torn last line (a crash while it
    was written, before the round's output left) is not a release."""
    if not path.exists():
        return []
    out = []
    for text in path.read_text().splitlines():
        try:
            out.append(parse(json.loads(text)))
        except (json.JSONDecodeError, TypeError, KeyError):
            break
    return out
