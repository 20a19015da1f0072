"""Tests for data.py: tokenizers, sources, preparation, the deterministic loader. Offline, CPU, fast."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from common import ConfigError  # noqa: E402


# --- helpers -------------------------------------------------------------------------------------

def make_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["growth", "model", "the", "of", "Llama", "naïve", "Größe", "日本語", "token", "😀", "stage"]
    return [f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for i in range(n)]


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "id": 0}) + "\n")
    return str(path)


def expected_streams(docs, k, eot=256):
    """What prepare should write with the bytes tokenizer: doc i in val iff i % k == 0."""
    streams = {"train": [], "val": []}
    for i, d in enumerate(docs):
        streams["val" if i % k == 0 else "train"] += list(d.encode("utf-8")) + [eot]
    return streams


def make_rows_dir(tmp_path, name, n_rows, seq_len, seed=0):
    """A prepared dir whose train split has exactly n_rows * seq_len + 1 tokens (so n_rows rows)."""
    src = tmp_path / f"src_{name}"
    src.mkdir()
    (src / "a.txt").write_text("validation document " * 20)  # doc 0 -> val (val_fraction 0.5)
    rng = np.random.default_rng(seed)
    (src / "b.txt").write_text("".join(rng.choice(list("abcdefghij"), size=n_rows * seq_len)))  # + eot
    out = tmp_path / name
    data.prepare(str(src), "bytes", str(out), val_fraction=0.5, num_workers=1)
    return str(out)


@pytest.fixture
def fresh_tokenizers():
    data.get_tokenizer.cache_clear()
    yield
    data.get_tokenizer.cache_clear()


# --- tokenizers ----------------------------------------------------------------------------------

def test_bytes_roundtrip_non_ascii():
    tok = data.get_tokenizer("bytes")
    text = "Größe of a naïve model: 日本語 and 😀, plus <|endoftext|> as plain text"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)  # specials are never parsed from text
    assert len(ids) == data.count_bytes(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "x"]) == [ids, [ord("x")]]
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"  # a cut multi-byte char is replaced, not raised


def test_bytes_specials():
    tok = data.get_tokenizer("bytes")
    assert tok.vocab_size == 320 and tok.vocab_size % 64 == 0
    names = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]
    assert set(names) <= set(tok.special)
    ids = [tok.special[n] for n in names]
    assert len(set(ids)) == len(ids) and all(256 <= i < tok.vocab_size for i in ids)
    assert tok.eot_id == tok.special["<|endoftext|>"] == 256
    assert tok.decode(tok.encode("hi") + [tok.special["<|user|>"]] + tok.encode("yo")) == "hi<|user|>yo"


def test_gpt2_offline_error_names_cache_dir(tmp_path, monkeypatch, fresh_tokenizers):
    # tiktoken fetches with requests.get and no timeout, which could hang on a firewalled network:
    # fail the fetch at once instead, so the test exercises the real path without touching the network.
    import requests
    import tiktoken.registry

    def offline(*a, **k):
        raise requests.ConnectionError("offline (test)")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.delenv("NANOGROW_GPT2_BPE", raising=False)  # and no local copy of the BPE files
    monkeypatch.setattr(requests, "get", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget a gpt2 loaded earlier online
    with pytest.raises(ConfigError) as err:
        data.get_tokenizer("gpt2")
    msg = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in msg
    assert "TIKTOKEN_CACHE_DIR" in msg and "GPT-2" in msg and "bytes" in msg


def test_gpt2_layout_with_stand_in_encoding(monkeypatch, fresh_tokenizers):
    # The real BPE files cannot be downloaded here; a byte-level stand-in with GPT-2's size and eot
    # checks the padding, where the chat specials go, and decoding around them.
    import tiktoken
    ranks = {bytes([i]): i for i in range(256)}
    enc = tiktoken.Encoding("gpt2", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc)
    tok = data.get_tokenizer("gpt2")
    assert tok.vocab_size == 50304 and tok.eot_id == 50256
    assert [tok.special[n] for n in ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]] \
        == [50257, 50258, 50259, 50260, 50261]
    ids = tok.encode("hello <|endoftext|>")
    assert 50256 not in ids
    assert tok.decode(ids + [50256, 50258]) == "hello <|endoftext|><|endoftext|><|user|>"


# --- the default corpus --------------------------------------------------------------------------

def corpus_hash(docs):
    return hashlib.sha256("\x00".join(docs).encode()).hexdigest()


def test_default_corpus_deterministic_english_large():
    docs = data.default_corpus()
    assert list(data.DEFAULT_MODULES) == sorted(data.DEFAULT_MODULES)
    n_chars = sum(map(len, docs))
    assert n_chars > 4_000_000 and len(docs) > 1000
    assert min(map(len, docs)) >= 200 and len(set(docs)) == len(docs)
    sample = "".join(docs[::50])
    assert sum(c.isascii() for c in sample) / len(sample) > 0.98
    words = sample.lower().split()
    assert sum(w in {"the", "a", "of", "to", "is", "and"} for w in words) / len(words) > 0.05
    # a fresh interpreter (other modules imported, other addresses, other hash seed) gathers the same
    code = ("import sys, hashlib; sys.path.insert(0, sys.argv[1]); import data; "
            "print(hashlib.sha256('\\x00'.join(data.default_corpus()).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == corpus_hash(docs), out.stderr[-2000:]


def test_prepare_default_capped(tmp_path):
    meta = data.prepare("default", "bytes", str(tmp_path / "d"), val_fraction=0.1, max_tokens=60_000, num_workers=1)
    n = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert 60_000 <= n < 60_000 + 200_000  # stops after the document that reaches the cap
    assert meta["versions"]["python"] and meta["versions"]["numpy"] == np.__version__
    docs = data.default_corpus()[:meta["n_docs"]]
    train, _ = data.load_prepared(str(tmp_path / "d"), "train")
    assert data.get_tokenizer("bytes").decode(train) == "".join(d + "<|endoftext|>" for i, d in enumerate(docs) if i % 10)


# --- preparation ---------------------------------------------------------------------------------

def test_prepare_roundtrip_and_reuse(tmp_path, capsys):
    docs = make_docs(30)
    src = tmp_path / "txt"
    src.mkdir()
    for i, d in enumerate(docs):
        (src / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    out = tmp_path / "prep"
    meta = data.prepare(str(src / "*.txt"), "bytes", str(out), val_fraction=0.25, num_workers=1)
    assert not meta["reused"] and sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
    want = expected_streams(docs, k=4)
    for split in ("train", "val"):
        arr, m = data.load_prepared(str(out), split)
        assert arr.dtype == np.uint16 and arr.tolist() == want[split]
        assert m["splits"][split]["tokens"] == len(want[split])
        assert m["splits"][split]["sha256"] == hashlib.sha256(np.asarray(arr).tobytes()).hexdigest()
    assert meta["n_docs"] == 30 and meta["splits"]["val"]["docs"] == 8  # docs 0, 4, ..., 28
    assert meta["splits"]["train"]["bytes"] == sum(data.count_bytes(d) for i, d in enumerate(docs) if i % 4)
    decoded = data.get_tokenizer("bytes").decode(data.load_prepared(str(out), "train")[0])
    assert decoded == "".join(d + "<|endoftext|>" for i, d in enumerate(docs) if i % 4)

    mtimes = [os.stat(out / f).st_mtime_ns for f in ("train.bin", "val.bin", "meta.json")]
    capsys.readouterr()
    again = data.prepare(str(src / "*.txt"), "bytes", str(out), val_fraction=0.25, num_workers=1)
    assert again["reused"] and "reusing" in capsys.readouterr().out
    assert [os.stat(out / f).st_mtime_ns for f in ("train.bin", "val.bin", "meta.json")] == mtimes
    other = data.prepare(str(src / "*.txt"), "bytes", str(out), val_fraction=0.5, num_workers=1)
    assert not other["reused"] and other["splits"]["val"]["docs"] == 15  # other arguments: prepared anew


def test_workers_1_and_2_identical(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", make_docs(200, seed=1))
    m1 = data.prepare(path, "bytes", str(tmp_path / "w1"), val_fraction=0.1, num_workers=1, chunk_docs=16)
    m2 = data.prepare(path, "bytes", str(tmp_path / "w2"), val_fraction=0.1, num_workers=2, chunk_docs=16)
    for split in ("train", "val"):
        a = data.load_prepared(str(tmp_path / "w1"), split)[0]
        b = data.load_prepared(str(tmp_path / "w2"), split)[0]
        assert np.array_equal(a, b)
        assert m1["splits"][split] == m2["splits"][split]
    m3 = data.prepare(path, "bytes", str(tmp_path / "w3"), val_fraction=0.1, num_workers=2, chunk_docs=16,
                      max_tokens=1000)  # leaving the pool early
    assert 1000 <= m3["splits"]["train"]["tokens"] + m3["splits"]["val"]["tokens"] < 1200


def test_sources_txt_jsonl_parquet_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = make_docs(12, seed=2)
    write_jsonl(tmp_path / "a.jsonl", docs[:6])
    write_jsonl(tmp_path / "b.jsonl", docs[6:])
    pq.write_table(pa.table({"id": list(range(12)), "text": docs}), tmp_path / "all.parquet", row_group_size=5)
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    assert list(data.iter_documents(str(tmp_path / "*.jsonl"))) == docs
    assert list(data.iter_documents(str(tmp_path / "all.parquet"))) == docs
    assert list(data.iter_documents(str(tmp_path / "txt"))) == docs  # a folder
    meta = data.prepare(str(tmp_path / "all.parquet"), "bytes", str(tmp_path / "pq"), val_fraction=0.5, num_workers=1)
    assert data.load_prepared(str(tmp_path / "pq"), "val")[0].tolist() == expected_streams(docs, 2)["val"]
    assert meta["sources"] == [str(tmp_path / "all.parquet")]
    with pytest.raises(ConfigError, match="no files match"):
        list(data.iter_documents(str(tmp_path / "nothing*.jsonl")))


def test_missing_column_is_one_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = make_docs(4)
    jl = write_jsonl(tmp_path / "x.jsonl", docs, field="body")
    pq.write_table(pa.table({"body": docs, "url": ["u"] * 4}), tmp_path / "x.parquet")
    for path in (jl, str(tmp_path / "x.parquet")):
        with pytest.raises(ConfigError) as err:
            data.prepare(path, "bytes", str(tmp_path / "out"), num_workers=1)
        msg = str(err.value)
        assert "\n" not in msg and os.path.basename(path) in msg
        assert "'text'" in msg and "body" in msg and "text_field" in msg
        assert list(data.iter_documents(path, text_field="body")) == docs
    assert not (tmp_path / "out" / "meta.json").exists() and not (tmp_path / "out" / "train.bin.tmp").exists()


def test_hf_source_spec(monkeypatch):
    # the hub is unreachable here: stand in for datasets.load_dataset and check what it is asked for
    import datasets
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return iter([{"text": "first doc", "url": "u"}, {"text": "second doc", "url": "v"}])
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = list(data.iter_documents("hf:HuggingFaceFW/fineweb-edu:sample-10BT"))
    assert docs == ["first doc", "second doc"]
    assert calls[-1] == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
    list(data.iter_documents("hf:org/ds@validation"))
    assert calls[-1] == ("org/ds", None, "validation", True)
    with pytest.raises(ConfigError, match="hf:org/ds: no column 'content' .*text, url.*text_field"):
        list(data.iter_documents("hf:org/ds", text_field="content"))
    assert data.default_out_dir("hf:HuggingFaceFW/fineweb-edu:sample-10BT", "gpt2").endswith("fineweb-edu-sample-10BT-gpt2")
    assert data.default_out_dir("corpora/web_*.parquet", "bytes").endswith("web-bytes")
    assert data.default_out_dir("default", "bytes") == os.path.join("data_cache", "default-bytes")


def test_load_prepared_errors(tmp_path):
    d = make_rows_dir(tmp_path, "d", n_rows=4, seq_len=8)
    _, meta = data.load_prepared(d)
    data.check_tokenizer(meta, "bytes", 320)
    with pytest.raises(ConfigError, match="tokenizer bytes .* gpt2"):
        data.check_tokenizer(meta, "gpt2", 50304)
    with pytest.raises(ConfigError, match="meta.json missing"):
        data.load_prepared(str(tmp_path / "nope"))
    with open(os.path.join(d, "train.bin"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(ConfigError, match="does not match"):
        data.load_prepared(d)


def test_cli_info(tmp_path, capsys):
    d = make_rows_dir(tmp_path, "d", n_rows=4, seq_len=8)
    data.main(["info", d])
    out = capsys.readouterr().out
    assert "tokenizer bytes (vocab 320)" in out and "train" in out and "val" in out
    with pytest.raises(SystemExit) as exit_info:
        data.main(["info", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "meta.json missing" in err and err.count("\n") == 1


# --- the loader ----------------------------------------------------------------------------------

def all_rows(loader, step):
    """{(micro_step, rank): [(source, row)]} of a global step, from one loader per rank."""
    out = {}
    for rank in range(loader.world_size):
        ld = data.BatchLoader([s.data_dir for s in loader.sources], loader.weights, batch_size=loader.batch_size,
                              seq_len=loader.seq_len, grad_accum=loader.grad_accum, rank=rank,
                              world_size=loader.world_size, seed=loader.seed, max_tokens=loader.max_tokens)
        for micro in range(loader.grad_accum):
            out[micro, rank] = ld.row_ids(step, micro)
    return out


def test_batches_are_rows_shifted(tmp_path):
    T = 8
    d = make_rows_dir(tmp_path, "d", n_rows=20, seq_len=T)
    ld = data.BatchLoader(d, batch_size=3, seq_len=T, seed=5)
    tokens = data.load_prepared(d)[0]
    x, y = ld.get_batch(2)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (3, T)
    for b, (_, r) in enumerate(ld.row_ids(2)):
        assert x[b].tolist() == tokens[r * T:r * T + T].tolist()
        assert y[b].tolist() == tokens[r * T + 1:r * T + T + 1].tolist()


def test_loader_pure_and_resumable(tmp_path):
    d = make_rows_dir(tmp_path, "d", n_rows=50, seq_len=8)
    kw = dict(batch_size=2, seq_len=8, grad_accum=2, world_size=2, seed=3)
    a = data.BatchLoader(d, rank=1, **kw)
    b = data.BatchLoader(d, rank=1, **kw)
    for step, micro in [(0, 0), (3, 1), (40, 0), (9, 1)]:  # any order, two objects: same batches
        assert all(torch.equal(u, v) for u, v in zip(a.get_batch(step, micro), b.get_batch(step, micro)))
    for step in range(7):  # the original run steps 0..6, then 7
        for micro in range(2):
            a.get_batch(step, micro)
    resumed = data.BatchLoader(d, rank=1, **kw)  # a run resumed at step 7
    for micro in range(2):
        assert all(torch.equal(u, v) for u, v in zip(a.get_batch(7, micro), resumed.get_batch(7, micro)))
    other_seed = data.BatchLoader(d, rank=1, **{**kw, "seed": 4})
    assert not torch.equal(a.get_batch(7)[0], other_seed.get_batch(7)[0])


def test_ranks_disjoint_and_cover_the_step(tmp_path):
    d = make_rows_dir(tmp_path, "d", n_rows=48, seq_len=4)
    ld = data.BatchLoader(d, batch_size=2, seq_len=4, grad_accum=2, world_size=4, seed=1)  # 16 rows a step
    # epoch 0: one seeded order of all rows; epoch e > 0: epoch 0's rows reordered by PCG64([seed, e])
    base = np.random.Generator(np.random.PCG64([1, 0])).permutation(48)
    perm = lambda e: base if e == 0 else base[np.random.Generator(np.random.PCG64([1, e])).permutation(48)]  # noqa: E731
    for step in range(7):  # crosses epochs 0 -> 1 -> 2
        slots = all_rows(ld, step)
        rows = [r for v in slots.values() for _, r in v]
        assert len(rows) == len(set(rows)) == 16
        epoch, first = divmod(step * 16, 48)
        assert sorted(rows) == sorted(perm(epoch)[first:first + 16].tolist())
        # and data.py's formula (the comment above BatchLoader): slot (micro, rank) takes g = step*G + (micro*world + rank)*B + i
        assert slots[1, 2] == [(0, int(perm(epoch)[first + (1 * 4 + 2) * 2 + i])) for i in range(2)]
    with pytest.raises(ConfigError, match="each step needs 16"):
        data.BatchLoader(d, batch_size=2, seq_len=4, grad_accum=2, world_size=4, max_tokens=40)


def test_epochs_counted_each_a_permutation(tmp_path):
    d = make_rows_dir(tmp_path, "d", n_rows=16, seq_len=4)
    ld = data.BatchLoader(d, batch_size=2, seq_len=4, grad_accum=2, seed=0)  # 4 rows a step, 4 steps an epoch
    per_epoch = [sorted(r for s in range(4 * e, 4 * e + 4) for m in range(2) for _, r in ld.row_ids(s, m))
                 for e in range(3)]
    assert all(p == list(range(16)) for p in per_epoch)  # every row exactly once per epoch
    order = [[r for m in range(2) for _, r in ld.row_ids(s, m)] for s in (0, 4)]
    assert order[0] != order[1]  # each epoch its own permutation
    name = os.path.basename(d)
    assert ld.epochs(0) == {name: 0.0} and ld.epochs(6) == {name: 1.5} and ld.epochs(12) == {name: 3.0}
    assert ld.tokens_seen(12) == 12 * 4 * 4
    # rows not a multiple of the step: epochs still read distinct rows, steps never repeat a row
    d2 = make_rows_dir(tmp_path, "d2", n_rows=18, seq_len=4)
    ld2 = data.BatchLoader(d2, batch_size=4, seq_len=4, seed=0)
    for e in range(3):
        rows = [r for s in range(4 * e, 4 * e + 4) for _, r in ld2.row_ids(s)]
        assert len(set(rows)) == 16 and max(rows) < 18
    assert ld2.epochs(8)[os.path.basename(d2)] == 2.0


def test_allocate_rows():
    assert data.allocate_rows([1, 1], 8) == [4, 4]
    assert data.allocate_rows([3, 1], 8) == [6, 2]
    assert data.allocate_rows([1, 1, 1], 8) == [3, 3, 2]
    assert data.allocate_rows([1000, 1], 4) == [3, 1]  # every positive weight gets a row
    assert data.allocate_rows([1, 0], 4) == [4, 0]
    assert data.allocate_rows([0.1, 0.2, 0.7], 10) == [1, 2, 7]
    with pytest.raises(ConfigError):
        data.allocate_rows([0, 0], 4)


@pytest.mark.parametrize("weights,want", [([1, 1], (4, 4)), ([3, 1], (6, 2))])
def test_mixture_exact_per_step(tmp_path, weights, want):
    en = make_rows_dir(tmp_path, "en", n_rows=30, seq_len=4, seed=1)
    ja = make_rows_dir(tmp_path, "ja", n_rows=9, seq_len=4, seed=2)
    ld = data.BatchLoader([en, ja], weights, batch_size=2, seq_len=4, grad_accum=2, world_size=2, seed=7)
    for step in range(10):
        rows = [sr for v in all_rows(ld, step).values() for sr in v]
        assert tuple(sum(s == i for s, _ in rows) for i in range(2)) == want
        assert len(set(rows)) == 8  # no row twice in a step
    assert data.BatchLoader([en, ja], weights, batch_size=2, seq_len=4, grad_accum=2, world_size=2,
                            seed=7).get_batch(3, 1)[0].tolist() == ld.get_batch(3, 1)[0].tolist()
    ep = ld.epochs(10)
    assert ep["en"] == pytest.approx(10 * want[0] / (30 // want[0] * want[0]))
    assert ep["ja"] == pytest.approx(10 * want[1] / (9 // want[1] * want[1]))


def test_max_tokens_cap(tmp_path):
    T, cap = 4, 40  # the cap holds 10 rows
    d = make_rows_dir(tmp_path, "d", n_rows=100, seq_len=T)
    capped = data.BatchLoader(d, batch_size=5, seq_len=T, max_tokens=cap, seed=2)
    full = data.BatchLoader(d, batch_size=5, seq_len=T, seed=2)
    seen = {r for step in range(20) for _, r in capped.row_ids(step)}
    assert len(seen) == 10  # exactly cap / seq_len unique rows, read again and again
    assert max(seen) >= 20  # a random subset of the whole split, not its first documents
    # the fixed-data stream reads what the full stream reads until the cap, then repeats (section 3.3)
    assert [capped.row_ids(s) for s in range(2)] == [full.row_ids(s) for s in range(2)]
    assert {r for s in range(2, 4) for _, r in capped.row_ids(s)} == {r for s in range(2) for _, r in full.row_ids(s)}
    assert capped.epochs(20)["d"] == 10.0  # repeats come sooner with fewer unique tokens
    assert full.epochs(20)["d"] == 1.0


def test_val_batches_fixed_contiguous(tmp_path):
    d = make_rows_dir(tmp_path, "d", n_rows=4, seq_len=8)
    val = data.load_prepared(d, "val")[0]  # "validation document " * 20 + eot = 401 tokens: 50 rows of 8
    batches = data.val_batches(d, batch_size=4, seq_len=8, n_batches=3)
    assert len(batches) == 3 and all(x.shape == (4, 8) for x, _ in batches)
    x, y = batches[1]
    assert x[0].tolist() == val[32:40].tolist() and y[0].tolist() == val[33:41].tolist()
    again = data.val_batches(d, batch_size=4, seq_len=8, n_batches=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert len(data.val_batches(d, batch_size=16, seq_len=8, n_batches=100)) == 4  # 50 rows: 16+16+16+2
    with pytest.raises(ConfigError, match="val split"):
        data.val_batches(d, batch_size=1, seq_len=1000, n_batches=1)
