"""Reading raw per-user text: the input formats (JSONL, CSV, Parquet, a folder of .txt files),
rows cleaned and counted by reason when bad, users hashed to device ids.

Kept apart from the two ingestion passes (`fleet.learning.data.ingest`) so that what counts as a
row, and as a bad one, is in one place with the formats that produce it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = ("jsonl", "csv", "parquet", "txt")
SPLITS = ("train", "eval")
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (surrogateescape)


class IngestError(Exception):
    """A usage error (missing input, unknown column): reported in one line, exit status 2."""


def device_of(user: str) -> tuple[int, float]:
    """(device id, split draw in [0, 1)) of a user id: a 63-bit id and an independent uniform."""
    h = hashlib.blake2b(user.encode("utf-8", "surrogateescape"), digest_size=16).digest()
    return int.from_bytes(h[:8], "little") >> 1, int.from_bytes(h[8:], "little") / 2.0**64


def device_id_of(user: str) -> int:
    """The device id fleet-ingest gives a user (for finding a user's data in a corpus)."""
    return device_of(user)[0]


# ---- reading raw rows ------------------------------------------------------------------------
def detect_format(path: Path) -> str:
    if path.is_dir():
        return "txt"
    suffix = path.suffix.lower()
    by_suffix = {
        ".jsonl": "jsonl",
        ".ndjson": "jsonl",
        ".json": "jsonl",
        ".csv": "csv",
        ".parquet": "parquet",
    }
    if suffix in by_suffix:
        return by_suffix[suffix]
    raise IngestError(f"{path}: cannot tell the format from the name; pass --format {'|'.join(FORMATS)}")


def input_size(path: Path, fmt: str) -> tuple[int, str]:
    """(total, unit) for the progress bar: rows of a Parquet file, bytes otherwise."""
    if fmt == "parquet":
        try:
            return pq.ParquetFile(path).metadata.num_rows, "rows"
        except (pa.ArrowInvalid, OSError) as e:
            raise IngestError(f"{path}: cannot read Parquet: {e}") from None
    if fmt == "txt":
        return sum(p.stat().st_size for p in txt_files(path)), "B"
    return path.stat().st_size, "B"


def txt_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.txt") if p.is_file())


NUMERIC_USER = "rows_numeric_user"  # counted with the bad reasons, reported apart from them


def _clean(user: Any, text: Any, bad: Counter[str]) -> tuple[str, str] | None:
    """The (user, text) of a row, or None after counting why the row is bad. A user id is a
    string or a whole number (many corpora number their users), read as its decimal string, so
    5 and "5" are one user; anything else (5.0, true, a list) is `non_string_user`. Good rows
    with a numeric user are counted under NUMERIC_USER, which the summary reports on its own."""
    if user is None or user == "":
        bad["missing_user"] += 1
        return None
    if isinstance(user, bool) or not isinstance(user, (str, int)):
        bad["non_string_user"] += 1
        return None
    numeric = isinstance(user, int)
    user = str(user)
    if text is None:
        bad["missing_text"] += 1
        return None
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            bad["undecodable"] += 1
            return None
    if not isinstance(text, str):
        bad["non_string_text"] += 1
        return None
    if not text.strip():
        bad["empty_text"] += 1  # no words: a user with only such rows would vanish uncounted
        return None
    if _SURROGATE.search(user) or _SURROGATE.search(text):
        bad["undecodable"] += 1
        return None
    if numeric:
        bad[NUMERIC_USER] += 1
    return user, text


def iter_rows(
    path: Path, fmt: str, user_col: str, text_col: str, bad: Counter[str], progress: Callable[[int], object]
) -> Iterator[tuple[str, str]]:
    """Good rows as (user, text); bad ones are counted in `bad` by reason. `progress(units)` is
    called as input is consumed (bytes, or rows for Parquet), good rows or not."""
    readers = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}
    if fmt == "txt":
        yield from _txt_rows(path, bad, progress)
    else:
        yield from readers[fmt](path, user_col, text_col, bad, progress)


def _jsonl_rows(
    path: Path, user_col: str, text_col: str, bad: Counter[str], progress: Callable[[int], object]
) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as f:
        for raw in _capped_lines(f, progress, bad):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                bad["undecodable"] += 1
                continue
            except ValueError:
                bad["invalid_json"] += 1
                continue
            if not isinstance(obj, dict):
                bad["not_an_object"] += 1
                continue
            row = _clean(obj.get(user_col), obj.get(text_col), bad)
            if row is not None:
                yield row


MAX_ROW_BYTES = 1 << 20  # a row (line) longer than this is counted as `row_too_long`, unread


def _capped_lines(f: Any, progress: Callable[[int], object], bad: Counter[str]) -> Iterator[bytes]:
    """The file's lines, each read at most MAX_ROW_BYTES + 1 bytes at a time: a longer line is
    skipped and counted, so one huge line cannot cost gigabytes (its JSON, its word list)."""
    while True:
        raw = f.readline(MAX_ROW_BYTES + 1)
        if not raw:
            return
        progress(len(raw))
        if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # the rest of the line, in bounded chunks
                raw = f.readline(MAX_ROW_BYTES + 1)
                progress(len(raw))
            bad["row_too_long"] += 1
            continue
        yield raw


def _csv_rows(
    path: Path, user_col: str, text_col: str, bad: Counter[str], progress: Callable[[int], object]
) -> Iterator[tuple[str, str]]:
    def lines() -> Iterator[str]:
        with open(path, "rb") as f:
            for raw in _capped_lines(f, progress, bad):
                yield raw.decode("utf-8", "surrogateescape")  # bad bytes are caught per row

    csv.field_size_limit(2**31 - 1)  # a user's text can be long; the default limit is 128 KiB
    reader = csv.reader(lines())
    header = next(reader, None)
    if header is None:
        return
    header = [h.lstrip("\ufeff") for h in header]
    for col in (user_col, text_col):
        if col not in header:
            raise IngestError(f"{path}: no column {col!r} (columns: {', '.join(header)})")
    ui, ti = header.index(user_col), header.index(text_col)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error:
            bad["malformed_csv"] += 1
            continue
        if not fields:
            continue
        user = fields[ui] if ui < len(fields) else None
        text = fields[ti] if ti < len(fields) else None
        row = _clean(user, text, bad)
        if row is not None:
            yield row


def _parquet_rows(
    path: Path, user_col: str, text_col: str, bad: Counter[str], progress: Callable[[int], object]
) -> Iterator[tuple[str, str]]:
    pf = pq.ParquetFile(path)  # readable: input_size opened it already
    names = pf.schema_arrow.names
    for col in (user_col, text_col):
        if col not in names:
            raise IngestError(f"{path}: no column {col!r} (columns: {', '.join(names)})")
    batches = pf.iter_batches(batch_size=8192, columns=[user_col, text_col])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as e:  # a damaged column chunk: not a row we can skip
            raise IngestError(f"{path}: corrupt Parquet data: {e}") from None
        progress(batch.num_rows)
        for user, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
            row = _clean(user, text, bad)
            if row is not None:
                yield row


def _txt_rows(
    folder: Path, bad: Counter[str], progress: Callable[[int], object]
) -> Iterator[tuple[str, str]]:
    for p in txt_files(folder):
        user = p.relative_to(folder).with_suffix("").as_posix()
        with open(p, "rb") as f:
            for raw in f:
                progress(len(raw))
                if not raw.strip():
                    continue
                try:
                    yield user, raw.decode("utf-8")
                except UnicodeDecodeError:
                    bad["undecodable"] += 1


# ---- the two passes --------------------------------------------------------------------------
