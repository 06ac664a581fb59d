"""Token conventions, word tokenization and the vocabulary file.

Every part of fleet (the model, the data, the canaries, the metrics) shares one id space:
pad=0, bos=1, eos=2, oov=3, then the V words as ids 4..V+3, most frequent first. Keeping the
specials at fixed small ids lets code mask padding (`ids == PAD`) without looking anything up.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

PAD, BOS, EOS, OOV = 0, 1, 2, 3
SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<oov>")
NUM_SPECIAL = len(SPECIALS)

# A word is a run of letters or digits (any script), with inner apostrophes kept ("don't").
# Punctuation and underscores separate words; they are not tokens (as in Gboard-style NWP).
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
# Sentence boundaries: a run of terminal punctuation, or a line break.
_SENTENCE = re.compile(r"[.!?;\n\r]+")


def words(text: str) -> list[str]:
    """Lowercased words of a text, in order."""
    return _WORD.findall(text.lower().replace("’", "'"))


def sentences(text: str) -> list[list[str]]:
    """The text split into sentences, each a non-empty list of lowercased words."""
    out = []
    for part in _SENTENCE.split(text):
        w = words(part)
        if w:
            out.append(w)
    return out


class WordCounter:
    """Word counts with a bound on distinct words, so counting a huge corpus fits in memory.

    When the table grows past `max_distinct` entries it keeps the `max_distinct // 2` most
    frequent and forgets the rest. Rare words lose their early counts, which can only matter
    for words near the top-V cut-off, and only when the corpus has more distinct words than the
    bound (`pruned` says whether that happened, and the ingest summary reports it).
    """

    def __init__(self, max_distinct: int):
        if max_distinct < 2:
            raise ValueError("max_distinct must be >= 2")
        self.max_distinct = max_distinct
        self.counts: Counter[str] = Counter()
        self.pruned = 0

    def update(self, ws: Iterable[str]) -> None:
        self.counts.update(ws)
        if len(self.counts) > self.max_distinct:
            self.counts = Counter(dict(self.counts.most_common(self.max_distinct // 2)))
            self.pruned += 1

    def top(self, n: int) -> list[str]:
        """The n most frequent words; ties broken alphabetically so the vocabulary is stable."""
        return [w for w, _ in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


class Vocabulary:
    """id <-> word for the full id space: the 4 specials, then the words."""

    def __init__(self, word_list: list[str]):
        self.itos: list[str] = list(SPECIALS) + list(word_list)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary has duplicate words")

    @property
    def size(self) -> int:
        """V: the number of words, without the specials."""
        return len(self.itos) - NUM_SPECIAL

    def encode(self, ws: Iterable[str]) -> list[int]:
        """Word ids; words outside the vocabulary (and the special names) become OOV."""
        get = self.stoi.get
        return [i if (i := get(w, OOV)) >= NUM_SPECIAL else OOV for w in ws]

    def decode(self, ids: Iterable[int] | np.ndarray) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    def save(self, path: str | Path) -> None:
        """One token per line, line number = id (specials included, so the file is the id map)."""
        Path(path).write_text("\n".join(self.itos) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if tuple(lines[:NUM_SPECIAL]) != SPECIALS:
            raise ValueError(f"{path}: the first lines must be the specials {', '.join(SPECIALS)}")
        return cls(lines[NUM_SPECIAL:])


def encode_sentence(ids: list[int], seq_len: int) -> list[list[int]]:
    """One sentence's word ids as examples of seq_len+1 ids: [bos, w1.., eos, pad..].

    A sentence longer than seq_len is cut into consecutive pieces of seq_len words, each its own
    example starting with bos (nothing is thrown away); only the last piece gets eos, and only if
    it has room, as in TFF's Stack Overflow task where a full-length example has no eos.
    """
    out = []
    for start in range(0, len(ids), seq_len):
        piece = ids[start : start + seq_len]
        row = [BOS, *piece]
        if len(piece) < seq_len:
            row.append(EOS)
        row.extend([PAD] * (seq_len + 1 - len(row)))
        out.append(row)
    return out
