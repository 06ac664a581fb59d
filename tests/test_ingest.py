"""fleet-ingest and the Arrow corpus: round trips, bad rows counted, bad corpora rejected clearly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fleet.config import Config, ConfigError, DataConfig, FleetConfig, ModelConfig, PrivacyConfig
from fleet.learning.data import BOS, EOS, OOV, PAD, make_corpus, unigram_baseline_recall
from fleet.learning.data.arrow import INDEX_FILE, SUMMARY_FILE, TRAIN_FILE, ArrowCorpus, CorpusWriter
from fleet.learning.data.ingest import main
from fleet.learning.data.rows import device_id_of
from fleet.learning.data.vocab import Vocabulary, encode_sentence, sentences

SEQ = 6
WORDS = [f"word{i}" for i in range(30)]


def user_texts(users: int = 40, rows: int = 3) -> dict[str, list[str]]:
    """Deterministic texts: several rows per user, sentences of 1..9 words from a small lexicon."""
    g = np.random.default_rng(0)
    out: dict[str, list[str]] = {}
    for u in range(users):
        out[f"user-{u}"] = [
            ". ".join(" ".join(g.choice(WORDS, g.integers(1, 10))) for _ in range(g.integers(1, 4)))
            for _ in range(rows)
        ]
    return out


def interleaved(texts: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Rows in round-robin user order, so a user's rows are scattered through the input."""
    rows = []
    for k in range(max(len(v) for v in texts.values())):
        rows += [(u, t[k]) for u, t in texts.items() if k < len(t)]
    return rows


def ingest(src: Path, out: Path, *flags: str) -> dict:
    assert main([str(src), str(out), "--no-progress", *flags]) == 0
    return json.loads((out / SUMMARY_FILE).read_text())


def corpus(path: Path, vocab_size: int, **data) -> ArrowCorpus:
    cfg = Config(
        fleet=FleetConfig(),
        model=ModelConfig(vocab_size=vocab_size, seq_len=SEQ),
        privacy=PrivacyConfig(),
        data=DataConfig(name="arrow", path=str(path), **data),
    )
    return make_corpus(cfg)


def expected_examples(rows: list[str], vocab: Vocabulary) -> np.ndarray:
    out = [ex for text in rows for s in sentences(text) for ex in encode_sentence(vocab.encode(s), SEQ)]
    return np.asarray(out, dtype=np.int32).reshape(-1, SEQ + 1)


def test_round_trip_jsonl(tmp_path: Path) -> None:
    texts = user_texts()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"user_id": u, "text": t}) + "\n" for u, t in interleaved(texts)))
    summary = ingest(
        src, tmp_path / "c", "--vocab-size", "30", "--seq-len", str(SEQ), "--eval-fraction", "0.25"
    )
    c = corpus(tmp_path / "c", 30)
    vocab = c.vocab()
    assert sorted(vocab[4:]) == sorted(WORDS)  # every word fits: no oov

    train_ids, counts = c.device_table(0, c.num_devices)
    assert np.all(np.diff(train_ids) > 0) and c.num_devices == summary["train_devices"]
    assert np.array_equal(c.num_examples(train_ids), counts)
    eval_rows = []
    for user, rows in texts.items():
        want = expected_examples(rows, Vocabulary(vocab[4:]))
        dev = device_id_of(user)
        if dev in set(train_ids.tolist()):
            got = c.examples(dev)
            assert np.array_equal(got, want)  # ids round-trip, in the user's input order
            decoded = [vocab[i] for r in got for i in r if i not in (BOS, EOS, PAD)]
            assert decoded == [w for text in rows for s in sentences(text) for w in s]  # words too
        else:
            with pytest.raises(KeyError):
                c.examples(dev)
            eval_rows.append(want)
    # Held-out users are exactly the eval split, none of them in training, some of them there.
    assert 0 < summary["eval_devices"] < len(texts)
    assert summary["eval_devices"] + summary["train_devices"] == len(texts)
    ev = c.eval_examples()
    assert len(ev) == summary["eval_examples"] == sum(len(r) for r in eval_rows)
    assert {r.tobytes() for r in ev} == {r.tobytes() for rows in eval_rows for r in rows}
    assert summary["rows_bad"] == 0 and summary["rows_ok"] == 120

    u = c.unigram()
    assert abs(u.sum() - 1) < 1e-12 and u[PAD] == 0 and u[EOS] > 0
    assert 0 < unigram_baseline_recall(c)["recall@1"] < 1


def test_ingest_is_deterministic_and_bucket_independent(tmp_path: Path) -> None:
    texts = user_texts(60, 4)
    src = tmp_path / "in.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "author"])
        w.writerows((t, u) for u, t in interleaved(texts))
    flags = ["--user-column", "author", "--vocab-size", "30", "--seq-len", str(SEQ), "--batch-rows", "7"]
    ingest(src, tmp_path / "a", *flags, "--buckets", "1")
    ingest(src, tmp_path / "b", *flags, "--buckets", "5", "--row-group-rows", "3")
    a, b = corpus(tmp_path / "a", 30), corpus(tmp_path / "b", 30)
    ids, counts = a.device_table(0, a.num_devices)
    ids_b, counts_b = b.device_table(0, b.num_devices)
    assert np.array_equal(ids, ids_b) and np.array_equal(counts, counts_b)
    for dev in ids:
        assert np.array_equal(a.examples(dev), b.examples(dev))
    assert np.array_equal(a.eval_examples(), b.eval_examples())
    assert a.vocab() == b.vocab()


def test_top_v_vocabulary_oov_and_cap(tmp_path: Path) -> None:
    # "common" appears everywhere, "rare<u>" once per user: a 1-word vocabulary keeps "common".
    src = tmp_path / "in.jsonl"
    lines = [{"user_id": f"u{u}", "text": f"common rare{u}. common"} for u in range(20) for _ in range(3)]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    s = ingest(src, tmp_path / "c", "--vocab-size", "1", "--seq-len", str(SEQ), "--max-examples", "4")
    c = corpus(tmp_path / "c", 1)
    assert c.vocab() == ["<pad>", "<bos>", "<eos>", "<oov>", "common"]
    ids, counts = c.device_table(0, c.num_devices)
    assert np.all(counts == 4)  # 6 sentences per user, capped at the first 4
    assert s["train_examples_over_cap"] == 2 * len(ids)
    first = c.examples(ids[0])
    assert first[0].tolist() == [BOS, 4, OOV, EOS, PAD, PAD, PAD]
    assert first[1].tolist() == [BOS, 4, EOS, PAD, PAD, PAD, PAD]
    # The data cap applies on read too.
    capped = corpus(tmp_path / "c", 1, max_examples_per_device=3)
    assert np.all(capped.num_examples(ids) == 3) and len(capped.examples(ids[0])) == 3
    assert len(capped.examples(ids[0], 2)) == 2


def test_too_few_words_pads_the_vocabulary(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"user_id": "a", "text": "only three words"}) + "\n")
    s = ingest(src, tmp_path / "c", "--vocab-size", "5", "--seq-len", str(SEQ), "--eval-fraction", "0")
    assert s["vocab_padded"] == 2
    assert corpus(tmp_path / "c", 5).vocab()[-2:] == ["<unused0>", "<unused1>"]


def test_malformed_rows_are_counted_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.jsonl"
    good = [json.dumps({"user_id": f"u{i}", "text": "hello there"}).encode() for i in range(5)]
    bad = [
        b"this is not json",
        b'{"user_id": "x", "text": "caf\xe9 au lait"}',  # latin-1 byte: not UTF-8
        b"[1, 2, 3]",
        b'{"text": "no user"}',
        b'{"user_id": null, "text": "null user"}',
        b'{"user_id": "x"}',
        b'{"user_id": "x", "text": null}',
        b'{"user_id": "x", "text": 42}',
        b'{"user_id": ["x"], "text": "list user"}',
        b'{"user_id": 7, "text": "an int user is fine"}',
    ]
    src.write_bytes(b"\n".join(good[:2] + bad + good[2:] + [b"", b"   "]) + b"\n")
    s = ingest(src, tmp_path / "c", "--vocab-size", "10", "--seq-len", str(SEQ))
    assert s["rows_ok"] == 6
    assert s["bad_rows"] == {
        "invalid_json": 1,
        "undecodable": 1,
        "not_an_object": 1,
        "missing_user": 2,
        "missing_text": 2,
        "non_string_text": 1,
        "non_string_user": 1,
    }
    assert s["rows_bad"] == 9
    out = capsys.readouterr().out
    assert "9 bad" in out and "missing_user: 2" in out


def test_malformed_rows_are_counted_csv_parquet_txt(tmp_path: Path) -> None:
    flags = ("--vocab-size", "10", "--seq-len", str(SEQ))
    src = tmp_path / "in.csv"
    src.write_bytes(b"user_id,text\nu1,hello world\nu2\n,no user\nu3,bad \xff byte\nu4,fine text\n")
    s = ingest(src, tmp_path / "csv", *flags)
    assert s["rows_ok"] == 2 and s["bad_rows"] == {"missing_text": 1, "missing_user": 1, "undecodable": 1}

    table = pa.table(
        {
            "user": ["a", None, "c", "d", "e"],
            "body": [b"good words", b"no user", None, b"\xff\xfe", b"more good words"],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    s = ingest(
        tmp_path / "in.parquet", tmp_path / "pq", *flags, "--user-column", "user", "--text-column", "body"
    )
    assert s["rows_ok"] == 2 and s["bad_rows"] == {"missing_text": 1, "missing_user": 1, "undecodable": 1}

    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    (folder / "alice.txt").write_bytes(b"first line of alice\n\nsecond \xc3\x28 line\nthird line\n")
    (folder / "sub" / "bob.txt").write_text("bob says hi\n")
    s = ingest(folder, tmp_path / "t", *flags, "--eval-fraction", "0")
    assert s["rows_ok"] == 3 and s["bad_rows"] == {"undecodable": 1}
    c = corpus(tmp_path / "t", 10)
    assert len(c.examples(device_id_of("alice"))) == 2 and len(c.examples(device_id_of("sub/bob"))) == 1


def test_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.csv"
    src.write_text("who,text\nu1,hi\n")
    assert main([str(src), str(tmp_path / "c"), "--no-progress"]) == 2
    assert "no column 'user_id'" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.jsonl"), str(tmp_path / "c"), "--no-progress"]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main([str(src), str(tmp_path / "full"), "--no-progress", "--user-column", "who"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def written(tmp_path: Path, tokens: np.ndarray, vocab_size: int = 10) -> Path:
    """A corpus whose train.parquet holds `tokens` as they are (what a buggy or foreign writer
    leaves): devices 10 (2 examples) and 20 (the rest)."""
    w = CorpusWriter(tmp_path / "c", Vocabulary([f"v{i}" for i in range(vocab_size)]), SEQ)
    ids = np.repeat([10, 20], [2, len(tokens) - 2])
    w.append("train", ids, np.ones_like(tokens))
    w.append("eval", np.array([5]), np.ones_like(tokens[:1]))
    w.close()
    flat = pa.array(tokens.ravel(), type=pa.int32())
    table = pa.table({"device_id": ids, "tokens": pa.FixedSizeListArray.from_arrays(flat, SEQ + 1)})
    pq.write_table(table, tmp_path / "c" / TRAIN_FILE, write_page_checksum=True)
    return tmp_path / "c"


def test_out_of_vocabulary_ids_raise_config_error(tmp_path: Path) -> None:
    tokens = np.full((4, SEQ + 1), 5, dtype=np.int32)
    tokens[3, 2] = 10 + 4  # first id past the end of a 10-word vocabulary
    c = corpus(written(tmp_path, tokens), 10)
    with pytest.raises(ConfigError, match=r"^data\.path: .*outside \[0, 14\)"):
        c.examples(20)
    with pytest.raises(ConfigError) as e:
        corpus(tmp_path / "c", 10).examples(10)  # same row group: rejected as a whole
    assert "\n" not in str(e.value) and "20" not in str(e.value).split("[")[0]  # no device id
    tokens[3, 2] = -1
    (tmp_path / "d").mkdir()
    c = corpus(written(tmp_path / "d", tokens), 10)
    with pytest.raises(ConfigError, match=r"^data\.path:"):
        c.examples(20)


def test_corrupt_or_mismatched_corpus_raises_config_error(tmp_path: Path) -> None:
    tokens = np.full((4, SEQ + 1), 5, dtype=np.int32)
    path = written(tmp_path, tokens)
    assert np.array_equal(corpus(path, 10).examples(20), tokens[2:])
    with pytest.raises(ConfigError, match=r"^data\.path: .*vocabulary of 10 words.*model\.vocab_size=11"):
        corpus(path, 11)
    with pytest.raises(ConfigError, match=r"^data\.path: .*not a corpus folder"):
        corpus(tmp_path / "nowhere", 10)
    # Truncated train file: caught when the corpus first reads it.
    data = (path / TRAIN_FILE).read_bytes()
    (path / TRAIN_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"^data\.path: cannot read Parquet file .*train\.parquet"):
        corpus(path, 10).examples(20)
    # Garbage in the tokens' data pages, footer intact: the page checksum catches it.
    (path / TRAIN_FILE).write_bytes(data)
    start = pq.ParquetFile(path / TRAIN_FILE).metadata.row_group(0).column(1).data_page_offset
    broken = bytearray(data)
    broken[start + 20 : start + 40] = b"\x5a" * 20
    (path / TRAIN_FILE).write_bytes(bytes(broken))
    with pytest.raises(ConfigError, match=r"^data\.path: corrupt Parquet file .*train\.parquet"):
        corpus(path, 10).examples(20)
    # Truncated device index: caught when the corpus is opened.
    idx = (path / INDEX_FILE).read_bytes()
    (path / INDEX_FILE).write_bytes(idx[:-10])
    with pytest.raises(ConfigError, match=r"^data\.path: cannot read Parquet file .*devices\.parquet"):
        corpus(path, 10)


def test_what_ingest_drops_is_counted_and_a_corpus_of_nobody_is_refused(tmp_path: Path, capsys) -> None:
    """Numeric user ids are users (counted apart); a text of whitespace only and a line past the
    row cap are counted as bad, never dropped silently; and nothing usable is exit 2, no corpus."""
    from fleet.learning.data import rows as rows_module

    src = tmp_path / "in.jsonl"
    rows = [{"user_id": "a", "text": "hello there"}, {"user_id": 5, "text": "numbered user"}]
    rows += [{"user_id": "ws", "text": "   \n\t "}, {"user_id": 5.0, "text": "a float is no id"}]
    lines = [json.dumps(r) for r in rows] + [json.dumps({"user_id": "big", "text": "w " * 700_000})]
    src.write_text("\n".join(lines) + "\n")
    s = ingest(src, tmp_path / "c", "--vocab-size", "10", "--seq-len", str(SEQ), "--eval-fraction", "0")
    assert s["rows_ok"] == 2 and s["rows_numeric_user"] == 1 and s["train_devices"] == 2
    assert s["bad_rows"] == {"empty_text": 1, "non_string_user": 1, "row_too_long": 1}
    assert rows_module.MAX_ROW_BYTES < len(lines[-1])
    assert "(1 with a numeric user id)" in capsys.readouterr().out
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("\n".join(json.dumps({"author": f"u{i}", "text": "x y"}) for i in range(742)) + "\n")
    assert main([str(only_bad), str(tmp_path / "none"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fleet-ingest: error: nothing usable: 0 training user(s) (--min-users 1)")
    assert "missing_user: 742" in err and err.count("\n") == 0 and not (tmp_path / "none").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main([str(empty), str(tmp_path / "none"), "--no-progress"]) == 2
    assert (
        main([str(src), str(tmp_path / "few"), "--no-progress", "--min-users", "3", "--eval-fraction", "0"])
        == 2
    )


def test_lowercasing_sentence_split_and_the_20_word_cut_with_literal_values() -> None:
    from fleet.learning.data.vocab import encode_sentence, sentences, words

    assert words("Hello, World! It’s GREAT: don’t-stop 42x e-mail.") == [
        "hello", "world", "it's", "great", "don't", "stop", "42x", "e", "mail",
    ]  # fmt: skip
    assert sentences("First one here. Second?! Third... and a half\nFourth line") == [
        ["first", "one", "here"], ["second"], ["third"], ["and", "a", "half"], ["fourth", "line"],
    ]  # fmt: skip
    # 23 words at seq_len 20: a full example with no eos, then the rest with eos and padding
    assert encode_sentence(list(range(10, 33)), 20) == [
        [1, *range(10, 30)],
        [1, 30, 31, 32, 2, *[0] * 16],
    ]
    assert encode_sentence(list(range(10, 30)), 20) == [[1, *range(10, 30)]]  # exactly 20: no eos
