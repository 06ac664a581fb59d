"""fleet-ingest: raw per-user text -> a corpus folder that `data=arrow` trains on.

    fleet-ingest INPUT OUT [--user-column user_id] [--text-column text] [--vocab-size 10000]
                 [--seq-len 20] [--max-examples 256] [--eval-fraction 0.1] ...

INPUT is a JSONL, CSV or Parquet file with a user column and a text column, or a folder of .txt
files, one per user (the user id is the file's path inside the folder, without .txt).

What it does, and why this way:
- Words: lowercased, regex word tokenization (`fleet.learning.data.vocab.words`), split into sentences;
  each sentence becomes one example of seq_len+1 ids ([bos, words.., eos, pad..]); a longer one
  is cut into pieces of seq_len words.
- Users -> devices: a user's device id is a 63-bit hash (BLAKE2b) of the user id, so ids are
  opaque and stable across re-ingests, and the held-out split is decided by other bits of the
  same hash (`--eval-fraction`), deterministically, with no list of users kept in memory.
- Vocabulary: the `--vocab-size` most frequent words of the training users only (held-out users
  must not leak into it); ties broken alphabetically; other words become oov.
- Two streaming passes over the input with bounded memory, so a corpus larger than memory works:
  pass 1 counts words (a bounded counter, `--max-distinct-words`); pass 2 encodes rows in batches
  and spills them to per-bucket Parquet files, buckets being ranges of device id. Rows of one
  user may be anywhere in the input, so the merge then sorts one bucket at a time (stable: a
  user's examples keep input order), keeps the first `--max-examples` of each device, and appends
  the bucket to the corpus. Memory is one bucket plus one batch; `--buckets` sets how many.
- Bad rows (undecodable bytes, invalid JSON, missing or non-string user/text) are counted by
  reason, never silently dropped: the counts are printed at the end and written to
  OUT/ingest_summary.json next to the corpus.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from fleet.learning.data.arrow import META_FILE, SUMMARY_FILE, CorpusWriter, examples_schema, examples_table
from fleet.learning.data.rows import (
    FORMATS,
    NUMERIC_USER,
    SPLITS,
    IngestError,
    detect_format,
    device_of,
    input_size,
    iter_rows,
    txt_files,
)
from fleet.learning.data.vocab import PAD, Vocabulary, WordCounter, encode_sentence, sentences, words

_MAX_BUCKETS = 256  # two spill files open per bucket; keep well under the open-file limit
_SPILL_BYTES_PER_INPUT_BYTE = 4.0  # int32 ids with padding take a few times the raw text


class Ingest:
    """One ingest run; `run()` does both passes and the merge, and returns the summary."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.src = Path(args.input)
        self.out = Path(args.output)
        if not self.src.exists():
            raise IngestError(f"{self.src}: no such file or folder")
        self.fmt = args.format or detect_format(self.src)
        self.total, self.unit = input_size(self.src, self.fmt)
        self.bad: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()

    def rows(self, desc: str, bad: Counter[str]) -> Iterator[tuple[str, str]]:
        a = self.args
        with tqdm(
            total=self.total,
            unit=self.unit,
            unit_scale=True,
            desc=desc,
            disable=not a.progress,
            file=sys.stderr,
        ) as bar:
            yield from iter_rows(self.src, self.fmt, a.user_column, a.text_column, bad, bar.update)

    def is_eval(self, draw: float) -> bool:
        return draw < self.args.eval_fraction

    def count_words(self) -> WordCounter:
        """Pass 1: word counts of the training users; counts and classifies every row."""
        counter = WordCounter(self.args.max_distinct_words)
        batch: list[str] = []
        for user, text in self.rows("pass 1/2: counting words", self.bad):
            self.stats["rows_ok"] += 1
            if not self.is_eval(device_of(user)[1]):
                batch.extend(words(text))
                if len(batch) >= 100_000:
                    counter.update(batch)
                    batch = []
        counter.update(batch)
        return counter

    def build_vocab(self, counter: WordCounter) -> Vocabulary:
        v = self.args.vocab_size
        top = counter.top(v)
        self.stats["vocab_padded"] = v - len(top)  # too few distinct words: unused placeholders
        return Vocabulary(top + [f"<unused{i}>" for i in range(v - len(top))])

    def spill(self, vocab: Vocabulary, spill_dir: Path, buckets: int) -> None:
        """Pass 2: encode every row and spill its examples to the bucket of its device id."""
        seq_len = self.args.seq_len
        schema = examples_schema(seq_len)
        writers: dict[tuple[str, int], pq.ParquetWriter] = {}
        ids: dict[str, list[int]] = {s: [] for s in SPLITS}
        toks: dict[str, list[list[int]]] = {s: [] for s in SPLITS}

        def flush(split: str) -> None:
            if not ids[split]:
                return
            dev = np.asarray(ids[split], dtype=np.int64)
            tok = np.asarray(toks[split], dtype=np.int32)
            bucket = ((dev >> 32) * buckets) >> 31  # ranges of id: buckets merge in id order
            for b in np.unique(bucket):
                sel = bucket == b
                key = (split, int(b))
                if key not in writers:
                    writers[key] = pq.ParquetWriter(spill_dir / f"{split}-{int(b):04d}.parquet", schema)
                table = examples_table(dev[sel], tok[sel])
                writers[key].write_table(table)
            ids[split], toks[split] = [], []

        rows_in_batch = 0
        for user, text in self.rows("pass 2/2: encoding", Counter()):
            dev, draw = device_of(user)
            split = "eval" if self.is_eval(draw) else "train"
            for sentence in sentences(text):
                encoded = encode_sentence(vocab.encode(sentence), seq_len)
                ids[split].extend([dev] * len(encoded))
                toks[split].extend(encoded)
            rows_in_batch += 1
            if rows_in_batch >= self.args.batch_rows:
                for s in SPLITS:
                    flush(s)
                rows_in_batch = 0
        for s in SPLITS:
            flush(s)
        for w in writers.values():
            w.close()

    def merge(self, writer: CorpusWriter, spill_dir: Path, buckets: int) -> None:
        """Sort each bucket by device (stable), cap examples per device, append in id order."""
        cap = self.args.max_examples
        for split in SPLITS:
            for b in tqdm(
                range(buckets), desc=f"merging {split}", disable=not self.args.progress, file=sys.stderr
            ):
                path = spill_dir / f"{split}-{b:04d}.parquet"
                if not path.exists():
                    continue
                t = pq.read_table(path)
                dev = t.column("device_id").to_numpy()
                tok = t.column("tokens").combine_chunks().values.to_numpy().reshape(len(dev), -1)
                order = np.argsort(dev, kind="stable")
                dev, tok = dev[order], tok[order]
                starts = np.flatnonzero(np.r_[True, dev[1:] != dev[:-1]])
                rank = np.arange(len(dev)) - np.repeat(starts, np.diff(np.r_[starts, len(dev)]))
                keep = rank < cap
                self.stats[f"{split}_examples_over_cap"] += int((~keep).sum())
                writer.append(split, dev[keep], tok[keep])
                path.unlink()

    def run(self) -> dict[str, Any]:
        a = self.args
        t0 = time.time()
        if self.out.exists() and any(self.out.iterdir()):
            if not a.overwrite:
                raise IngestError(f"{self.out}: exists and is not empty (pass --overwrite to replace it)")
            (self.out / META_FILE).unlink(missing_ok=True)  # a half-rewritten corpus must not load
        self.out.mkdir(parents=True, exist_ok=True)
        counter = self.count_words()
        vocab = self.build_vocab(counter)
        buckets = a.buckets or _auto_buckets(self.src, self.fmt, a.bucket_mb)
        spill_dir = self.out / ".spill"
        shutil.rmtree(spill_dir, ignore_errors=True)
        spill_dir.mkdir()
        writer = CorpusWriter(self.out, vocab, a.seq_len, a.row_group_rows)
        try:
            self.spill(vocab, spill_dir, buckets)
            self.merge(writer, spill_dir, buckets)
        finally:
            shutil.rmtree(spill_dir, ignore_errors=True)
        summary = self.summary(writer, counter, buckets, time.time() - t0)
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        writer.close(
            {"source": str(self.src), "eval_fraction": a.eval_fraction, "max_examples": a.max_examples}
        )
        return summary

    def summary(
        self, writer: CorpusWriter, counter: WordCounter, buckets: int, seconds: float
    ) -> dict[str, Any]:
        targets = writer.unigram_counts.copy()
        targets[PAD] = 0
        oov = int(targets[3])
        bad = {k: v for k, v in self.bad.items() if k != NUMERIC_USER}
        return {
            "input": str(self.src),
            "format": self.fmt,
            "rows_ok": self.stats["rows_ok"],
            "rows_numeric_user": self.bad[NUMERIC_USER],
            "rows_bad": sum(bad.values()),
            "bad_rows": dict(sorted(bad.items())),
            "train_devices": writer.devices["train"],
            "eval_devices": writer.devices["eval"],
            "train_examples": writer.rows["train"],
            "eval_examples": writer.rows["eval"],
            "train_examples_over_cap": self.stats["train_examples_over_cap"],
            "eval_examples_over_cap": self.stats["eval_examples_over_cap"],
            "vocab_size": self.args.vocab_size,
            "vocab_padded": self.stats["vocab_padded"],
            "distinct_words_counted": len(counter.counts),
            "word_counter_pruned": counter.pruned,
            "train_oov_rate": oov / max(int(targets.sum()), 1),
            "seq_len": self.args.seq_len,
            "buckets": buckets,
            "seconds": round(seconds, 3),
        }


def _auto_buckets(src: Path, fmt: str, bucket_mb: float) -> int:
    """Enough buckets that one bucket's spilled examples fit in about bucket_mb of memory."""
    size = sum(p.stat().st_size for p in txt_files(src)) if fmt == "txt" else src.stat().st_size
    if fmt == "parquet":
        size *= 4  # compressed columns expand
    return int(min(_MAX_BUCKETS, max(1, math.ceil(size * _SPILL_BYTES_PER_INPUT_BYTE / (bucket_mb * 2**20)))))


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"ingested {s['input']} ({s['format']}) in {s['seconds']:.1f}s",
        f"  rows: {s['rows_ok']} ok"
        + (f" ({s['rows_numeric_user']} with a numeric user id)" if s.get("rows_numeric_user") else "")
        + f", {s['rows_bad']} bad"
        + (" (" + ", ".join(f"{k}: {v}" for k, v in s["bad_rows"].items()) + ")" if s["bad_rows"] else ""),
        f"  train: {s['train_devices']} devices, {s['train_examples']} examples "
        f"({s['train_examples_over_cap']} over the per-device cap)",
        f"  eval:  {s['eval_devices']} devices, {s['eval_examples']} examples "
        f"({s['eval_examples_over_cap']} over the per-device cap)",
        f"  vocabulary: {s['vocab_size']} words ({s['vocab_padded']} unused placeholders), "
        f"train oov rate {s['train_oov_rate']:.2%}",
    ]
    if s["word_counter_pruned"]:
        lines.append(
            f"  note: more distinct words than --max-distinct-words; the counter was pruned "
            f"{s['word_counter_pruned']} time(s), so the vocabulary cut-off is approximate"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet-ingest",
        description="Turn per-user raw text into a fleet corpus (vocabulary + Parquet) for data=arrow.",
    )
    p.add_argument("input", help="JSONL, CSV or Parquet file, or a folder of .txt files (one per user)")
    p.add_argument("output", help="corpus folder to write (then train with data=arrow data.path=OUTPUT)")
    p.add_argument("--format", choices=FORMATS, help="input format (default: from the name)")
    p.add_argument("--user-column", default="user_id", help="column/field naming the user (default: user_id)")
    p.add_argument("--text-column", default="text", help="column/field holding the text (default: text)")
    p.add_argument(
        "--vocab-size", type=int, default=10_000, help="V words, without specials (= model.vocab_size)"
    )
    p.add_argument("--seq-len", type=int, default=20, help="words per example (= model.seq_len)")
    p.add_argument(
        "--max-examples", type=int, default=256, help="cap on examples per device (first in input order)"
    )
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of users held out for evaluation")
    p.add_argument(
        "--max-distinct-words", type=int, default=2_000_000, help="bound on the word counter's size"
    )
    p.add_argument("--batch-rows", type=int, default=20_000, help="input rows encoded per spill batch")
    p.add_argument("--buckets", type=int, default=0, help="spill buckets (default: from the input size)")
    p.add_argument("--bucket-mb", type=float, default=256.0, help="target memory per bucket for --buckets=0")
    p.add_argument(
        "--row-group-rows",
        type=int,
        default=4096,
        help="examples per Parquet row group: the unit a shard decodes to read one device",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus folder")
    p.add_argument(
        "--min-users",
        type=int,
        default=1,
        help="fail (exit 2, nothing written) below this many training users",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def _check_args(a: argparse.Namespace) -> None:
    for name, ok in (
        ("--vocab-size", a.vocab_size >= 1),
        ("--seq-len", a.seq_len >= 1),
        ("--max-examples", a.max_examples >= 1),
        ("--eval-fraction", 0.0 <= a.eval_fraction < 1.0),
        ("--max-distinct-words", a.max_distinct_words >= 2 * a.vocab_size),
        ("--batch-rows", a.batch_rows >= 1),
        ("--buckets", 0 <= a.buckets <= _MAX_BUCKETS),
        ("--row-group-rows", a.row_group_rows >= 1),
        ("--min-users", a.min_users >= 1),
    ):
        if not ok:
            raise IngestError(f"{name}: out of range (see fleet-ingest --help)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        _check_args(args)
        existed = Path(args.output).exists()
        summary = Ingest(args).run()
        if summary["train_devices"] < args.min_users:
            if not existed:
                shutil.rmtree(args.output, ignore_errors=True)
            bad = ", ".join(f"{k}: {v}" for k, v in summary["bad_rows"].items())
            raise IngestError(
                f"nothing usable: {summary['train_devices']} training user(s) (--min-users {args.min_users}) "
                f"from {summary['rows_ok']} good and {summary['rows_bad']} bad rows"
                + (f" ({bad}); check --user-column and --text-column" if bad else "")
                + ("; nothing written" if not existed else "")
            )
    except IngestError as e:
        print(f"fleet-ingest: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"  wrote {args.output} (summary: {Path(args.output) / SUMMARY_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
