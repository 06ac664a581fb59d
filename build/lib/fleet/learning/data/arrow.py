"""A corpus on disk: Parquet files written by fleet-ingest, read memory-mapped by device.

Layout of a corpus folder (`data.path`):

- `train.parquet`: columns device_id (int64) and tokens (fixed_size_list<int32>[seq_len+1]),
  one row per example, rows grouped by device and devices in ascending id order.
- `devices.parquet`: the device index, ascending: device_id, offset (first row in
  train.parquet), num_examples. Row i of this file is the fleet's device row i, so a shard
  owning population rows [start, stop) asks `device_table(start, stop)` for its devices.
- `eval.parquet`: the held-out devices' examples (same columns as train.parquet).
- `vocab.txt`: one token per line, line number = id, the 4 specials first.
- `meta.json`: format version, vocab_size, seq_len, counts, and the target-token counts of the
  training examples (the unigram). `ingest_summary.json`: what fleet-ingest read and skipped.

Why Parquet with fixed-size lists: a row group's tokens decode into one contiguous int32 buffer
that reshapes to (rows, seq_len+1) without copying, and memory-mapping means a shard pages in
only the row groups of devices it trains. Decoded row groups are kept in a small LRU cache,
because a shard's devices are contiguous in the file and often share row groups. Files are
written with page checksums and read with verification, so a corrupted page is an error rather
than silently wrong token ids.

Errors the user can cause (a wrong path, a corrupt or truncated file, token ids outside
[0, V+4), a corpus built for another vocabulary) raise ConfigError naming data.path. They never
name a device: which devices train is secret (docs/ARCHITECTURE.md, invariant 3).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fleet.config import ConfigError
from fleet.learning.data.vocab import NUM_SPECIAL, Vocabulary
from fleet.phones.population import read_rows

TRAIN_FILE = "train.parquet"
EVAL_FILE = "eval.parquet"
INDEX_FILE = "devices.parquet"
VOCAB_FILE = "vocab.txt"
META_FILE = "meta.json"
SUMMARY_FILE = "ingest_summary.json"
FORMAT = "fleet-corpus"
VERSION = 1
KEY = "data.path"
_CACHED_GROUPS = 16  # decoded train row groups kept per corpus (about 340 KB each by default)
_INDEX_GROUP_ROWS = 1 << 16  # devices per row group of the index


def tokens_type(seq_len: int) -> pa.DataType:
    """fixed_size_list<int32 not null>[seq_len+1]: non-nullable, so Parquet stores no definition
    levels for the ids and a row group decodes faster."""
    return pa.list_(pa.field("item", pa.int32(), nullable=False), seq_len + 1)


def examples_schema(seq_len: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("device_id", pa.int64(), nullable=False),
            pa.field("tokens", tokens_type(seq_len), nullable=False),
        ]
    )


def examples_table(device_ids: np.ndarray, tokens: np.ndarray) -> pa.Table:
    """Rows of (device_id, tokens) from int64 ids and an int32 (rows, seq_len+1) array."""
    flat = pa.array(np.ascontiguousarray(tokens, dtype=np.int32).ravel(), type=pa.int32())
    seq_len = tokens.shape[1] - 1
    return pa.table(
        {
            "device_id": pa.array(device_ids, type=pa.int64()),
            "tokens": pa.FixedSizeListArray.from_arrays(flat, type=tokens_type(seq_len)),
        },
        schema=examples_schema(seq_len),
    )


INDEX_SCHEMA = pa.schema([("device_id", pa.int64()), ("offset", pa.int64()), ("num_examples", pa.int32())])


class CorpusWriter:
    """Writes a corpus folder incrementally, so ingesting never holds the corpus in memory.

    `append` takes whole devices in ascending id order (ingest merges its spill buckets in
    order, so this holds); rows are buffered into row groups of `row_group_rows`.
    """

    def __init__(self, path: str | Path, vocab: Vocabulary, seq_len: int, row_group_rows: int = 4096):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.vocab = vocab
        self.seq_len = seq_len
        self.row_group_rows = row_group_rows
        schema = examples_schema(seq_len)
        self._writers = {
            "train": pq.ParquetWriter(self.path / TRAIN_FILE, schema, write_page_checksum=True),
            "eval": pq.ParquetWriter(self.path / EVAL_FILE, schema, write_page_checksum=True),
        }
        self._index = pq.ParquetWriter(self.path / INDEX_FILE, INDEX_SCHEMA, write_page_checksum=True)
        self._buffers: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "eval": []}
        self._buffered = {"train": 0, "eval": 0}
        self._last_id = {"train": -(2**63), "eval": -(2**63)}
        self.rows = {"train": 0, "eval": 0}
        self.devices = {"train": 0, "eval": 0}
        self.unigram_counts = np.zeros(vocab.size + NUM_SPECIAL, dtype=np.int64)
        self._index_buffer: list[pa.Table] = []
        self._index_rows = 0

    def append(self, split: str, device_ids: np.ndarray, tokens: np.ndarray) -> None:
        """Add examples (one row per example, grouped by device, ids ascending) to a split."""
        device_ids = np.asarray(device_ids, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int32).reshape(len(device_ids), self.seq_len + 1)
        if not len(device_ids):
            return
        hi = self.unigram_counts.size
        if tokens.min() < 0 or tokens.max() >= hi:
            raise ValueError(f"{split}: token ids must be in [0, {hi})")
        if np.any(np.diff(device_ids) < 0) or device_ids[0] <= self._last_id[split]:
            raise ValueError(f"{split}: devices must arrive whole and in ascending id order")
        self._last_id[split] = int(device_ids[-1])
        starts = np.flatnonzero(np.r_[True, device_ids[1:] != device_ids[:-1]])
        self.devices[split] += len(starts)
        if split == "train":
            counts = np.diff(np.r_[starts, len(device_ids)])
            index = pa.table(
                {
                    "device_id": device_ids[starts],
                    "offset": self.rows["train"] + starts.astype(np.int64),
                    "num_examples": counts.astype(np.int32),
                },
                schema=INDEX_SCHEMA,
            )
            self._index_buffer.append(index)
            self._index_rows += len(index)
            if self._index_rows >= _INDEX_GROUP_ROWS:
                self._flush_index()
            self.unigram_counts += np.bincount(tokens[:, 1:].ravel(), minlength=hi)
        self.rows[split] += len(device_ids)
        self._buffers[split].append((device_ids, tokens))
        self._buffered[split] += len(device_ids)
        while self._buffered[split] >= self.row_group_rows:
            self._flush(split, self.row_group_rows)

    def _flush(self, split: str, rows: int) -> None:
        ids = np.concatenate([b[0] for b in self._buffers[split]])
        tok = np.concatenate([b[1] for b in self._buffers[split]])
        table = examples_table(ids[:rows], tok[:rows])
        self._writers[split].write_table(table, row_group_size=rows)
        self._buffers[split] = [(ids[rows:], tok[rows:])] if rows < len(ids) else []
        self._buffered[split] = len(ids) - rows

    def _flush_index(self) -> None:
        self._index.write_table(pa.concat_tables(self._index_buffer), row_group_size=self._index_rows)
        self._index_buffer, self._index_rows = [], 0

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Flush, close the files, write vocab.txt and meta.json; returns the metadata."""
        for split in ("train", "eval"):
            if self._buffered[split]:
                self._flush(split, self._buffered[split])
            self._writers[split].close()
        if self._index_rows:
            self._flush_index()
        self._index.close()
        self.vocab.save(self.path / VOCAB_FILE)
        counts = self.unigram_counts.copy()
        counts[0] = 0  # pad is never a target that counts
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "vocab_size": self.vocab.size,
            "seq_len": self.seq_len,
            "train_devices": self.devices["train"],
            "train_examples": self.rows["train"],
            "eval_devices": self.devices["eval"],
            "eval_examples": self.rows["eval"],
            **(extra or {}),
            "unigram_counts": counts.tolist(),
        }
        (self.path / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
        return meta


class ArrowCorpus:
    """A FederatedCorpus over a folder written by fleet-ingest (or `CorpusWriter`)."""

    def __init__(self, data: Any, vocab_size: int, seq_len: int):
        self.path = Path(data.path)
        self.vocab_size = int(vocab_size)
        self.seq_len = int(seq_len)
        self.cap = int(data.max_examples_per_device)
        self.eval_n = int(data.eval_examples)
        self.meta = self._read_meta()
        self._index = self._open(INDEX_FILE)
        if not self._index.schema_arrow.equals(INDEX_SCHEMA, check_metadata=False):
            raise ConfigError(f"{KEY}: {INDEX_FILE} does not have the columns {INDEX_SCHEMA.names}")
        self.num_devices: int = self._index.metadata.num_rows
        self._train: pq.ParquetFile | None = None
        self._group_starts: np.ndarray | None = None
        self._groups: OrderedDict[int, np.ndarray] = OrderedDict()
        self._index_groups: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._index_mins: np.ndarray | None = None
        self._eval: np.ndarray | None = None

    # ---- FederatedCorpus -----------------------------------------------------------------
    def examples(self, device_id: int, n: int | None = None) -> np.ndarray:
        """The device's stored examples, in ingest order, at most n and at most the cap."""
        offsets, counts = self._lookup(np.asarray([device_id], dtype=np.int64))
        count = int(counts[0]) if n is None else min(int(counts[0]), int(n))
        return self._train_rows(int(offsets[0]), int(offsets[0]) + count)

    def num_examples(self, device_ids: np.ndarray) -> np.ndarray:
        """Stored examples per device, capped at data.max_examples_per_device (int32)."""
        return self._lookup(np.asarray(device_ids, dtype=np.int64))[1]

    def device_table(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop) of the device index: (device_ids int64, num_examples int32, capped)."""
        t = read_rows(self.path / INDEX_FILE, start, stop, ["device_id", "num_examples"], key=KEY)
        ids = t.column("device_id").to_numpy().astype(np.int64)
        counts = np.minimum(t.column("num_examples").to_numpy(), self.cap).astype(np.int32)
        return ids, counts

    def eval_examples(self) -> np.ndarray:
        """The first data.eval_examples rows of eval.parquet (held-out devices, id order)."""
        if self._eval is None:
            pf = self._open(EVAL_FILE)
            parts, have = [], 0
            for g in range(pf.metadata.num_row_groups):
                if have >= self.eval_n:
                    break
                parts.append(self._decode(pf, g, EVAL_FILE))
                have += len(parts[-1])
            empty = np.zeros((0, self.seq_len + 1), dtype=np.int32)
            self._eval = np.concatenate(parts)[: self.eval_n] if parts else empty
        return self._eval

    def unigram(self) -> np.ndarray:
        """Target-token frequencies of the training examples (pad 0), from meta.json."""
        counts = np.asarray(self.meta["unigram_counts"], dtype=np.float64)
        counts[0] = 0.0
        total = counts.sum()
        return counts / total if total > 0 else counts

    def vocab(self) -> list[str]:
        try:
            itos = Vocabulary.load(self.path / VOCAB_FILE).itos
        except (OSError, ValueError) as e:
            raise ConfigError(f"{KEY}: cannot read the vocabulary: {e}") from None
        if len(itos) != self.vocab_size + NUM_SPECIAL:
            raise ConfigError(f"{KEY}: {VOCAB_FILE} has {len(itos)} tokens, expected V+4")
        return itos

    # ---- reading -------------------------------------------------------------------------
    def _read_meta(self) -> dict[str, Any]:
        where = f"{KEY}: {str(self.path)!r}"
        try:
            meta = json.loads((self.path / META_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"{where} is not a corpus folder (no {META_FILE}); write one with fleet-ingest"
            ) from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}: cannot read {META_FILE}: {e}") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ConfigError(f"{where}: {META_FILE} is not a {FORMAT} v{VERSION} corpus")
        if meta.get("vocab_size") != self.vocab_size:
            raise ConfigError(
                f"{where} has a vocabulary of {meta.get('vocab_size')} words, "
                f"but model.vocab_size={self.vocab_size}"
            )
        if meta.get("seq_len") != self.seq_len:
            raise ConfigError(
                f"{where} has sequences of {meta.get('seq_len')} words, but model.seq_len={self.seq_len}"
            )
        if len(meta.get("unigram_counts", ())) != self.vocab_size + NUM_SPECIAL:
            raise ConfigError(f"{where}: {META_FILE} has no unigram counts for V+4 ids")
        return meta

    def _open(self, name: str) -> pq.ParquetFile:
        path = self.path / name
        try:
            pf = pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)
        except FileNotFoundError:
            raise ConfigError(f"{KEY}: no such file {str(path)!r}") from None
        except (pa.ArrowInvalid, OSError) as e:
            raise ConfigError(f"{KEY}: cannot read Parquet file {str(path)!r}: {e}") from None
        return pf

    def _decode(self, pf: pq.ParquetFile, group: int, name: str) -> np.ndarray:
        """One row group's tokens as int32 (rows, seq_len+1), with every id checked."""
        try:
            col = pf.read_row_group(group, columns=["tokens"]).column("tokens")
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            raise ConfigError(f"{KEY}: corrupt Parquet file {str(self.path / name)!r}: {e}") from None
        width = self.seq_len + 1
        t = col.type
        if not (pa.types.is_fixed_size_list(t) and t.list_size == width and t.value_type == pa.int32()):
            raise ConfigError(
                f"{KEY}: {name} column tokens is {col.type}, expected fixed_size_list<int32>[{width}]"
            )
        arr = col.combine_chunks()
        if arr.null_count or arr.values.null_count:
            raise ConfigError(f"{KEY}: {name} has missing token values")
        tok = arr.values.to_numpy()[arr.offset * width : (arr.offset + len(arr)) * width]
        tok = tok.reshape(len(arr), width)
        hi = self.vocab_size + NUM_SPECIAL
        if tok.size and (tok.min() < 0 or tok.max() >= hi):
            raise ConfigError(
                f"{KEY}: {name} has token ids outside [0, {hi}) (vocab_size={self.vocab_size} "
                "plus 4 specials); was it written for another vocabulary?"
            )
        return tok

    def _train_rows(self, start: int, stop: int) -> np.ndarray:
        if self._train is None:
            self._train = self._open(TRAIN_FILE)
            md = self._train.metadata
            sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            self._group_starts = np.r_[0, np.cumsum(sizes, dtype=np.int64)]
        starts = self._group_starts
        if stop > starts[-1]:
            raise ConfigError(f"{KEY}: {INDEX_FILE} points past the end of {TRAIN_FILE} (truncated?)")
        if stop <= start:
            return np.zeros((0, self.seq_len + 1), dtype=np.int32)
        first = int(np.searchsorted(starts, start, side="right")) - 1
        last = int(np.searchsorted(starts, stop - 1, side="right")) - 1
        parts = [self._group(g) for g in range(first, last + 1)]
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        base = starts[first]
        return rows[start - base : stop - base]

    def _group(self, g: int) -> np.ndarray:
        if g in self._groups:
            self._groups.move_to_end(g)
            return self._groups[g]
        assert self._train is not None
        tok = self._decode(self._train, g, TRAIN_FILE)
        self._groups[g] = tok
        if len(self._groups) > _CACHED_GROUPS:
            self._groups.popitem(last=False)
        return tok

    def _lookup(self, device_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, capped counts) of devices, reading only the index row groups they fall in."""
        if self.num_devices == 0:
            raise KeyError("device not in the corpus")
        if self._index_mins is None:
            self._index_mins = self._index_group_mins()
        mins = self._index_mins
        groups = np.maximum(np.searchsorted(mins, device_ids, side="right") - 1, 0)
        offsets = np.empty(len(device_ids), dtype=np.int64)
        counts = np.empty(len(device_ids), dtype=np.int32)
        for g in np.unique(groups):
            ids, offs, cnts = self._index_group(int(g))
            sel = groups == g
            pos = np.minimum(np.searchsorted(ids, device_ids[sel]), len(ids) - 1)
            if len(ids) == 0 or np.any(ids[pos] != device_ids[sel]):
                raise KeyError("device not in the corpus")
            offsets[sel] = offs[pos]
            counts[sel] = np.minimum(cnts[pos], self.cap)
        return offsets, counts

    def _index_group_mins(self) -> np.ndarray:
        """Smallest device id of each index row group, from the Parquet statistics."""
        md = self._index.metadata
        col = INDEX_SCHEMA.get_field_index("device_id")
        mins = []
        for g in range(md.num_row_groups):
            stats = md.row_group(g).column(col).statistics
            if stats is None or not stats.has_min_max:
                mins.append(int(self._index_group(g)[0][0]))
            else:
                mins.append(int(stats.min))
        return np.asarray(mins, dtype=np.int64)

    def _index_group(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if g not in self._index_groups:
            try:
                t = self._index.read_row_group(g)
            except (pa.ArrowInvalid, OSError) as e:
                raise ConfigError(f"{KEY}: corrupt Parquet file {INDEX_FILE}: {e}") from None
            self._index_groups[g] = (
                t.column("device_id").to_numpy(),
                t.column("offset").to_numpy(),
                t.column("num_examples").to_numpy(),
            )
        return self._index_groups[g]
