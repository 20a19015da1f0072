"""eval.py and report.py on small fixtures (tests/fixtures/eval: a few hand-written rows in each
dataset's schema), checked against independent recomputations: transformers' LlamaForCausalLM in
float64 on the same weights (export_hf), the prompts written out literally from lm-evaluation-harness's
YAMLs, closed forms for a model with uniform logits, data.val_batches with the model's own loss,
and a Bernoulli sampler of known pass rate for PassUntil."""

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import eval as ev  # noqa: E402
import report  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from hf import export_hf  # noqa: E402
from model import Llama, ModelConfig  # noqa: E402

FIX = os.path.join(ROOT, "tests", "fixtures", "eval")
TOK = data.get_tokenizer("bytes")
V = TOK.vocab_size  # 320
CHOICE_TASKS = ["arc_easy", "arc_challenge", "winogrande", "piqa", "openbookqa", "hellaswag"]


def tiny_model(seed=0, max_seq_len=96, sharp=True):
    torch.manual_seed(seed)
    model = Llama(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                              max_seq_len=max_seq_len)).eval()
    if sharp:  # a random model is nearly uniform; a larger head makes the choices differ by more than noise
        with torch.no_grad():
            model.lm_head.weight.mul_(40)
    return model


def uniform_model(max_seq_len=96):
    model = tiny_model(max_seq_len=max_seq_len)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0: every token has probability 1/V
    return model


def save_ckpt(model, path):
    save_checkpoint({"model": model.state_dict(), "model_config": asdict(model.config),
                     "tokenizer": {"name": "bytes", "vocab_size": V}}, path)


def docs(name):
    return ev.load_docs(name, FIX)


def run(name, model, **kw):
    kw.setdefault("progress", False)
    return ev.RUNNERS[ev.TASKS[name].kind](model, TOK, docs(name), task=ev.TASKS[name], **kw)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, one thread is faster


CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared bytes dataset (data.prepare): 8 documents, val = documents 0, 2, 4, 6."""
    root = tmp_path_factory.mktemp("prep")
    src = root / "src"
    src.mkdir()
    rows = [json.loads(line) for name in ("lambada", "wikitext") for line in open(os.path.join(FIX, name + ".jsonl"))]
    texts = [r.get("text") or r["page"] for r in rows] + ["Fin. " * 40]
    for i, t in enumerate(texts):
        (src / f"doc{i}.txt").write_text(t, encoding="utf-8")
    data.prepare(str(src), "bytes", str(root / "out"), val_fraction=0.5, num_workers=1)
    return str(root / "out")


# -----------------------------------------------------------------------------
# prompts and tokenization, written out from the harness


def test_prompts_are_the_harness_templates():
    arc = ev.arc_doc(docs("arc_easy")[0])
    q = "Question: Which of these objects gives off its own light?\nAnswer:"
    assert arc == ([q] * 4, [" a mirror", " the Sun", " the Moon", " a window"], 1, [8, 7, 8, 8])
    assert ev.arc_doc(docs("arc_easy")[3])[2] == 1  # numeric labels "1".."4": answerKey "2" is index 1
    assert ev.piqa_doc(docs("piqa")[1]) == (["Question: To soften hard brown sugar,\nAnswer:"] * 2,
                                            [" put it in the freezer for a day.", " seal it in a container with a slice of bread overnight."],
                                            1, [32, 55])
    obqa = ev.openbookqa_doc(docs("openbookqa")[0])
    assert obqa[0][0] == "A magnet will most likely attract" and obqa[1][1] == " an iron nail" and obqa[2] == 1
    # WinoGrande: the option fills the blank and makes the context; the rest is the shared continuation
    assert ev.winogrande_doc(docs("winogrande")[0]) == (
        ["The trophy would not fit in the suitcase because the trophy", "The trophy would not fit in the suitcase because the suitcase"],
        [" was too big.", " was too big."], 0, [59, 61])
    # HellaSwag: ctx_b capitalized; " [title]" -> ". ", [...] removed, double spaces collapsed, stripped
    hs = ev.hellaswag_doc(docs("hellaswag")[0])
    assert hs[0][0] == "Making a sandwich: A man lays two slices of bread on a cutting board. He"
    hs = ev.hellaswag_doc(docs("hellaswag")[1])
    assert hs[0][0] == ("Home and Garden: How to repot a houseplant. Choose a slightly larger pot. "
                        "The new pot should be one or two inches wider than the old one.")
    assert hs[1] == ["  Make sure it has a drainage hole in the bottom.", "  Throw the plant away. It will never grow again.",
                     " You can paint the pot with two colors of nail polish.", "  Water the pot before buying it."]
    assert ev.lambada_split("a b c") == ("a b", " c")
    assert ev.wikitext_detokenize(" = = A = = \n x @-@ y , z ( 1 @.@ 5 m ) it 's \" q \" \n") == \
        " == A ==\nx-y, z (1.5 m) it's \"q\"\n"


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_string():
    assert ev.encode_pair(TOK, "abc  ", "d") == (list(b"abc"), list(b"  d"))
    assert ev.encode_pair(TOK, "", "xy") == ([TOK.eot_id], list(b"xy"))

    class MergingTok:  # a toy BPE: "ab" is one token (99); a merge across the boundary goes with the continuation
        def encode(self, s):
            return [99 if t == "ab" else ord(t) for t in re.findall(r"ab|.", s, re.S)]
    assert MergingTok().encode("xab") == [ord("x"), 99]
    assert ev.encode_pair(MergingTok(), "xa", "bc") == ([ord("x"), ord("a")], [ord("c")])
    # too long for the model: the context is cut from the left
    assert ev.make_request([1, 2, 3, 4], [5, 6], 4) == ([2, 3, 4, 5, 6], 2)


def test_rolling_windows_score_every_token_once():
    for n, L, c in [(1, 8, 1), (8, 8, 1), (9, 8, 1), (30, 8, 1), (30, 8, 5), (30, 8, 8), (100, 16, 9)]:
        seen = []
        for a, b, k in ev.rolling_windows(n, L, c):
            assert 0 <= a and b - a - 1 <= L and 0 < k <= b - a - 1  # fits the model, k scored positions
            seen += list(range(b - k, b))
            if b - k > 1:  # after the first window: at least context_len tokens before the scored ones
                assert b - k - a >= min(c, b - k)
        assert seen == list(range(1, n + 1)), (n, L, c)
    assert ev.rolling_windows(0, 8) == []


# -----------------------------------------------------------------------------
# scores against transformers in float64


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(seed=3, max_seq_len=96)
    path = tmp_path_factory.mktemp("hf") / "hf"
    export_hf(model, path, tokenizer=TOK)
    hf = transformers.LlamaForCausalLM.from_pretrained(path).double().eval()

    def logprobs(seq):
        """float64 log-probs of seq[1:] (and whether each is the argmax), one forward over seq[:-1]."""
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([list(seq[:-1])])).logits[0].double(), -1)
        target = torch.tensor(list(seq[1:]))
        return logp.gather(-1, target[:, None])[:, 0], logp.argmax(-1) == target
    return model, logprobs


@pytest.mark.parametrize("name", CHOICE_TASKS)
def test_choice_tasks_match_transformers(name, hf_reference):
    model, logprobs = hf_reference
    L = model.config.max_seq_len
    ours64 = run(name, model.double(), batch_size=3)
    ours32 = run(name, model.float(), batch_size=3)
    acc, acc_norm = [], []
    for d, got64, got32 in zip(docs(name), ours64[1], ours32[1]):
        contexts, conts, gold, _ = ev.TASKS[name].doc(d)
        lls = []
        for ctx, cont in zip(contexts, conts):
            assert not ctx.endswith(" ")  # so the bytes of each part are its tokens
            c, x = list(ctx.encode()), list(cont.encode())
            seq = (c + x)[-(L + 1):]  # left truncation, as the harness
            lls.append(logprobs(seq)[0][-len(x):].sum().item())
        # float64 agrees to ~1e-8 relative: model.py keeps its RoPE tables in float32 whatever the dtype
        np.testing.assert_allclose(got64["lls"], lls, rtol=1e-7, atol=0)
        np.testing.assert_allclose(got32["lls"], lls, rtol=0, atol=2e-4)  # float32: ~2e-5 seen
        lengths = [len(x) - 1 for x in conts]  # characters of the choice, without the " " delimiter
        acc.append(np.argmax(lls) == gold)
        acc_norm.append(np.argmax(np.array(lls) / lengths) == gold)
    assert ours64[0]["acc"]["value"] == pytest.approx(np.mean(acc))
    assert ours64[0]["acc"]["n"] == len(acc)
    p, n = np.mean(acc), len(acc)
    assert ours64[0]["acc"]["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    if name == "winogrande":
        assert "acc_norm" not in ours64[0]
    else:
        assert ours64[0]["acc_norm"]["value"] == pytest.approx(np.mean(acc_norm))


def float64_throughout(hf):
    """transformers' Llama computes RoPE's angles (LlamaRotaryEmbedding) and RMSNorm (LlamaRMSNorm) in float32 whatever
    the model's dtype: both in float64 here, so the reference is float64 throughout."""
    cfg = hf.config
    theta = cfg.rope_parameters["rope_theta"]  # transformers 5's place for it
    inv_freq = 1.0 / theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)

    def rope(x, position_ids):
        angles = position_ids.double()[..., None] * inv_freq
        angles = torch.cat([angles, angles], -1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    hf.model.rotary_emb.forward = rope
    for norm in [m for m in hf.modules() if type(m).__name__ == "LlamaRMSNorm"]:
        norm.forward = (lambda n: lambda h: n.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + n.variance_epsilon))(norm)
    return hf


def test_per_request_agreement_with_the_harness_method(tmp_path):
    # README, "Into transformers, lm-evaluation-harness and vLLM": the harness scores a request with transformers in
    # the model's dtype, the continuation's log-probs summed. float32: both sides round, about 1e-6 relative; float64:
    # transformers' float32 RoPE angles and RMSNorm keep the same gap, and with those in float64 eval.py's float64
    # scores are exact (to 1e-12 relative)
    transformers = pytest.importorskip("transformers")
    model = tiny_model(seed=5, max_seq_len=96)
    export_hf(model, tmp_path / "hf", tokenizer=TOK)
    L = model.config.max_seq_len
    for dtype, exact, atol, rtol in ((torch.float32, False, 1e-4, 0), (torch.float64, True, 0, 1e-12)):
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=dtype).eval()
        hf = float64_throughout(hf) if exact else hf
        ours = tiny_model(seed=5, max_seq_len=96).to(dtype)  # a fresh copy: its RoPE tables never went through float32
        for name in ["arc_easy", "hellaswag", "lambada"]:
            for d, got in zip(docs(name), run(name, ours, batch_size=3)[1]):
                if name == "lambada":
                    context, word = d["text"].rsplit(" ", 1)
                    requests, lls = [(context, " " + word)], [got["ll"]]
                else:
                    requests, lls = list(zip(*ev.TASKS[name].doc(d)[:2])), got["lls"]
                for (context, continuation), ll in zip(requests, lls):
                    c, x = ev.encode_pair(TOK, context, continuation)
                    seq = torch.tensor([(c + x)[-(L + 1):]])
                    with torch.no_grad():
                        logp = torch.log_softmax(hf(seq[:, :-1]).logits[0], -1)
                    theirs = logp.gather(-1, seq[0, 1:, None])[-len(x):].double().sum().item()
                    assert ll == pytest.approx(theirs, abs=atol, rel=rtol), (dtype, name, ll, theirs)


def test_lambada_and_wikitext_match_transformers(hf_reference):
    model, logprobs = hf_reference
    model = model.double()
    L = model.config.max_seq_len
    metrics, details = run("lambada", model, batch_size=2)
    lls, greedy = [], []
    for d, got in zip(docs("lambada"), details):
        context, word = d["text"].rsplit(" ", 1)
        c, x = list(context.encode()), list((" " + word).encode())
        lp, is_max = logprobs((c + x)[-(L + 1):])
        lls.append(lp[-len(x):].sum().item())
        greedy.append(bool(is_max[-len(x):].all()))
        assert got["ll"] == pytest.approx(lls[-1], rel=1e-7)
    assert metrics["acc"]["value"] == pytest.approx(np.mean(greedy))
    assert math.log(metrics["perplexity"]["value"]) == pytest.approx(-np.mean(lls), rel=1e-7)

    # WikiText: chunks of L tokens, each scored in one window of the L tokens before its last token,
    # the first one after an end-of-text token; words and bytes of the original page
    metrics, details = run("wikitext", model, batch_size=4)
    nll, words, nbytes, sizes = 0.0, 0, 0, []
    for d in docs("wikitext"):
        full = [TOK.eot_id] + list(ev.wikitext_detokenize(d["page"]).encode())
        sizes.append(len(full))
        for s in range(0, len(full) - 1, L):
            e = min(s + L, len(full) - 1)  # this chunk predicts full[s+1 .. e]
            a = max(0, e - L)
            lp, _ = logprobs(full[a:e + 1])
            nll -= lp[s - a:].sum().item()
        words += len(re.split(r"\s+", d["page"]))
        nbytes += len(d["page"].encode("utf-8"))
    assert max(sizes) > 3 * L and min(sizes) < 2 * L  # pages of several windows and of a partial last one
    assert math.log(metrics["word_perplexity"]["value"]) == pytest.approx(nll / words, rel=1e-7)
    assert math.log(metrics["byte_perplexity"]["value"]) == pytest.approx(nll / nbytes, rel=1e-7)
    assert metrics["bits_per_byte"]["value"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-7)


# -----------------------------------------------------------------------------
# closed forms, the validation split, batching


def test_uniform_logits_closed_forms(prepared):
    model = uniform_model().double()  # float64, so the closed forms hold to ~1e-12
    logV = math.log(V)
    for name in CHOICE_TASKS:
        metrics, _ = run(name, model)
        acc, acc_norm = [], []
        for d in docs(name):
            _, conts, gold, _ = ev.TASKS[name].doc(d)
            lls = [-len(x.encode()) * logV for x in conts]  # every token costs log V
            acc.append(int(np.argmax(lls)) == gold)  # the fewest bytes wins (ties: the first)
            acc_norm.append(int(np.argmax(np.array(lls) / [len(x) - 1 for x in conts])) == gold)
        assert metrics["acc"]["value"] == pytest.approx(np.mean(acc)), name
        if "acc_norm" in metrics:
            assert metrics["acc_norm"]["value"] == pytest.approx(np.mean(acc_norm)), name
    metrics, _ = run("lambada", model)
    n_cont = [len((" " + d["text"].rsplit(" ", 1)[1]).encode()) for d in docs("lambada")]
    assert metrics["acc"]["value"] == 0  # argmax is id 0, a NUL byte no text holds
    assert metrics["perplexity"]["value"] == pytest.approx(math.exp(np.mean(n_cont) * logV), rel=1e-9)
    metrics, _ = run("wikitext", model)
    n_tok = sum(len(ev.wikitext_detokenize(d["page"]).encode()) for d in docs("wikitext"))
    words = sum(len(re.split(r"\s+", d["page"])) for d in docs("wikitext"))
    nbytes = sum(len(d["page"].encode()) for d in docs("wikitext"))
    assert metrics["word_perplexity"]["value"] == pytest.approx(math.exp(n_tok * logV / words), rel=1e-9)
    assert metrics["bits_per_byte"]["value"] == pytest.approx(n_tok * math.log2(V) / nbytes, rel=1e-9)
    for stride in (None, 40):
        metrics, _ = ev.eval_valid(model, TOK, prepared, stride=stride, progress=False)
        assert metrics["perplexity"]["value"] == pytest.approx(V, rel=1e-9)
        split = json.load(open(os.path.join(prepared, "meta.json")))["splits"]["val"]
        assert metrics["bits_per_byte"]["value"] == pytest.approx(math.log2(V) * split["tokens"] / split["bytes"], rel=1e-9)


def test_valid_equals_val_batches_and_stride_scores_each_token_once(prepared):
    model = tiny_model(seed=5, max_seq_len=64).double()
    L = model.config.max_seq_len
    tokens, _ = data.load_prepared(prepared, "val")
    k = (len(tokens) - 1) // L  # full rows
    metrics, details = ev.eval_valid(model, TOK, prepared, limit=k, progress=False)
    (x, y), = data.val_batches(prepared, batch_size=k, seq_len=L, n_batches=1)
    with torch.no_grad():
        loss = model(x, y)[1].item()
    assert metrics["loss"]["value"] == pytest.approx(loss, rel=1e-12)
    assert metrics["perplexity"]["value"] == pytest.approx(math.exp(loss), rel=1e-12)

    # stride S < L: token p is scored once; the window of a chunk ending at e holds the L tokens before e
    S = 24
    metrics, details = ev.eval_valid(model, TOK, prepared, stride=S, progress=False)
    full = torch.tensor(tokens.astype(np.int64))
    n, nll, count, e0 = len(full) - 1, 0.0, 0, 0
    chunks = [(0, min(L, n))] + [(s, min(s + S, n)) for s in range(min(L, n), n, S)]
    for s, e in chunks:
        a = max(0, e - L)
        with torch.no_grad():
            logp = torch.log_softmax(model(full[None, a:e])[0][0], -1)
        for p in range(s + 1, e + 1):
            nll -= logp[p - 1 - a, full[p]].item()
            count += 1
        e0 = e
    assert e0 == n and count == n == sum(d["tokens"] for d in details)
    assert metrics["loss"]["value"] == pytest.approx(nll / n, rel=1e-12)


def test_batch_size_does_not_change_scores(prepared):
    model = tiny_model(seed=7, max_seq_len=96)
    for name in ["hellaswag", "arc_challenge", "lambada", "wikitext"]:
        one, eight = run(name, model, batch_size=1)[1], run(name, model, batch_size=8)[1]
        key = {"hellaswag": "lls", "arc_challenge": "lls", "lambada": "ll", "wikitext": "nll"}[name]
        flat = lambda details: np.concatenate([np.atleast_1d(d[key]) for d in details])  # noqa: E731
        np.testing.assert_allclose(flat(one), flat(eight), rtol=0, atol=1e-5, err_msg=name)
    one = ev.eval_valid(model, TOK, prepared, stride=50, batch_size=1, progress=False)[1]
    eight = ev.eval_valid(model, TOK, prepared, stride=50, batch_size=8, progress=False)[1]
    np.testing.assert_allclose([d["nll"] for d in one], [d["nll"] for d in eight], rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# PassUntil


def test_pass_until_estimator_is_unbiased_and_one_over_attempts_is_not():
    p, r, reps = 0.05, 3, 3000
    rng = np.random.default_rng(0)
    results = [ev.pass_until(lambda k: rng.random(k) < p, bool, r=r, cap=10**6, batch=64) for _ in range(reps)]
    assert not any(x.capped for x in results) and all(x.passes == r for x in results)
    est = np.array([x.estimate for x in results])
    assert np.allclose(est, [(r - 1) / (x.attempts - 1) for x in results])
    se = est.std(ddof=1) / math.sqrt(reps)
    assert abs(est.mean() - p) < 3 * se, (est.mean(), se)
    naive = np.array([r / x.attempts for x in results])  # r / attempts: biased high
    assert naive.mean() - p > 10 * naive.std(ddof=1) / math.sqrt(reps)
    first = np.array([1 / ev.pass_until(lambda k: rng.random(k) < p, bool, r=1, cap=10**6, batch=64).attempts
                      for _ in range(reps)])  # sample until the first pass, 1/attempts: E = p ln(1/p)/(1-p)
    assert first.mean() == pytest.approx(p * math.log(1 / p) / (1 - p), rel=0.1)
    # capped: never passes
    res = ev.pass_until(lambda k: [False] * k, bool, r=2, cap=50, batch=16)
    assert res.capped and res.attempts == 50 and res.passes == 0 and res.estimate == 0
    res = ev.pass_until(lambda k: [True] * k, bool, r=2, cap=50, batch=16)
    assert not res.capped and res.attempts == 2 and res.estimate == 1


def test_model_pass_until_samples_the_model():
    model = uniform_model(max_seq_len=32)  # every token (and first byte) equally likely
    good = set("abcdefghijklmnopqrstuvwxyzABCDEF")  # 32 of 320 ids: p = 0.1
    est = [ev.model_pass_until(model, TOK, "Hello", lambda t: t[:1] in good, r=4, cap=2000, max_new_tokens=1,
                               batch=64, seed=s).estimate for s in range(40)]
    se = np.std(est, ddof=1) / math.sqrt(len(est))
    assert abs(np.mean(est) - 0.1) < 4 * se
    metrics, details = run("lambada_pu", tiny_model(max_seq_len=96), r=2, cap=4, batch_size=4)
    assert metrics["pass_until"]["n"] == len(docs("lambada")) and len(details) == len(docs("lambada"))
    assert all(d["attempts"] <= 4 for d in details)


# -----------------------------------------------------------------------------
# scaling laws


def test_loss_law_and_task_law_recover_known_parameters():
    N = np.geomspace(1e5, 1e8, 6)
    E, A, alpha = 1.8, 60.0, 0.31
    fit = report.fit_loss_law(N, report.loss_law(N, E, A, alpha))
    np.testing.assert_allclose(fit, (E, A, alpha), rtol=1e-5)
    fit = report.fit_loss_law(N[:2], report.loss_law(N[:2], 0.0, A, alpha))  # two points: pure power law
    np.testing.assert_allclose(fit, (0.0, A, alpha), rtol=1e-5, atol=1e-9)
    c, alpha = 250.0, 0.42
    pu = report.task_law(N, c, alpha)
    assert 0 < pu.min() and pu.max() < 1
    np.testing.assert_allclose(report.fit_task_law(N, pu), (c, alpha), rtol=1e-9)


# -----------------------------------------------------------------------------
# the command line, the series report and the fit


def test_cli_checkpoint_and_hf_folder(tmp_path, prepared):
    model = tiny_model(seed=2, max_seq_len=96)
    save_ckpt(model, tmp_path / "m.pt")
    export_hf(model, tmp_path / "hf", tokenizer=TOK)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(docs("arc_easy")), tmp_path / "arc.parquet")
    out = subprocess.run([sys.executable, "eval.py", str(tmp_path / "m.pt"), str(tmp_path / "hf"), "--tasks",
                          "valid,arc_easy,winogrande,wikitext", "--task_data", FIX, "--task_data", f"arc_easy={tmp_path / 'arc.parquet'}",
                          "--data_dir", prepared, "--limit", "3", "--batch_size", "4", "--device", "cpu", "--out", str(tmp_path / "r.json")],
                         cwd=ROOT, env=CLI_ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.load(open(tmp_path / "r.json"))
    a, b = res[str(tmp_path / "m.pt")], res[str(tmp_path / "hf")]
    assert set(a) == {"valid", "arc_easy", "winogrande", "wikitext"} and a["arc_easy"]["acc"]["n"] == 3
    for task in a:
        for metric in a[task]:
            assert a[task][metric]["value"] == pytest.approx(b[task][metric]["value"], rel=1e-6)
    lines = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert len(lines) == 4 and "arc_easy acc_norm" in lines[0]
    bad = subprocess.run([sys.executable, "eval.py", str(tmp_path / "m.pt"), "--tasks", "nope"], cwd=ROOT, env=CLI_ENV,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown task(s) ['nope']" in bad.stderr


def test_cli_samples_log_every_request(tmp_path, prepared):
    # --samples: one JSON line per document (per window for valid) with its requests and their scores, as the
    # harness's --log_samples; they agree with the scores of the table and with an in-process run
    model = tiny_model(seed=2, max_seq_len=96)
    save_ckpt(model, tmp_path / "m.pt")
    out = subprocess.run([sys.executable, "eval.py", str(tmp_path / "m.pt"), "--tasks", "valid,arc_easy,lambada,wikitext",
                          "--task_data", FIX, "--data_dir", prepared, "--limit", "3", "--device", "cpu",
                          "--out", str(tmp_path / "r.json"), "--samples", str(tmp_path / "s.jsonl")],
                         cwd=ROOT, env=CLI_ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.load(open(tmp_path / "r.json"))[str(tmp_path / "m.pt")]
    records = [json.loads(line) for line in open(tmp_path / "s.jsonl", encoding="utf-8")]
    assert {r["model"] for r in records} == {str(tmp_path / "m.pt")}
    by_task = {t: [r for r in records if r["task"] == t] for t in res}
    assert all([r["doc_id"] for r in by_task[t]] == list(range(3)) for t in res)
    arc, in_process = by_task["arc_easy"], run("arc_easy", model)[1][:3]
    for r, d, doc in zip(arc, in_process, docs("arc_easy")):
        contexts, conts, gold, _ = ev.arc_doc(doc)
        assert r["arguments"] == [[c, x] for c, x in zip(contexts, conts)] and len(r["greedy"]) == len(conts)
        np.testing.assert_allclose(r["lls"], d["lls"], rtol=0, atol=1e-5)
        assert r["gold"] == gold and r["pred"] == int(np.argmax(r["lls"])) and r["answer"] == conts[r["pred"]]
        assert r["acc"] == (r["pred"] == gold) and r["acc_norm"] == (r["pred_norm"] == gold)
    assert res["arc_easy"]["acc"]["value"] == pytest.approx(np.mean([r["acc"] for r in arc]))
    lam = by_task["lambada"]
    assert [r["arguments"] for r in lam] == [[list(ev.lambada_split(d["text"]))] for d in docs("lambada")[:3]]
    assert res["lambada"]["acc"]["value"] == pytest.approx(np.mean([r["greedy"] for r in lam]))
    assert math.log(res["lambada"]["perplexity"]["value"]) == pytest.approx(-np.mean([r["ll"] for r in lam]))
    wiki = by_task["wikitext"]
    assert all(r["windows"] >= 1 for r in wiki)
    assert math.log(res["wikitext"]["word_perplexity"]["value"]) == pytest.approx(
        sum(r["nll"] for r in wiki) / sum(r["words"] for r in wiki))
    assert res["valid"]["loss"]["value"] == pytest.approx(sum(r["nll"] for r in by_task["valid"]) /
                                                          sum(r["tokens"] for r in by_task["valid"]))
    bad = subprocess.run([sys.executable, "eval.py", str(tmp_path / "m.pt"), "--tasks", "lambada", "--task_data", FIX,
                          "--samples", str(tmp_path / "no" / "such" / "dir.jsonl")], cwd=ROOT, env=CLI_ENV,
                         capture_output=True, text=True, timeout=120)
    err = bad.stderr.strip()
    assert bad.returncode == 2 and err.startswith("error: --samples") and "\n" not in err


def write_series(run_dir, with_ckpts=False, root="grow"):
    """A fake finished series in the contract's layout (0-based stage indices, as train.py writes):
    S1 trained from scratch, listed once (as train.py does, mode "grow": the chain's start; or as
    "scratch"); S2, S3 from scratch and grown; S3 grown with fixed data. Scratch runs train 40 tokens
    per parameter (FLOPs 6·X·40X); a grown run's cumulative FLOPs are the same total."""
    os.makedirs(run_dir / "runs", exist_ok=True)
    params = {1: 1e5, 2: 2e5, 3: 4e5}
    losses = {(root, 1): 3.4, ("scratch", 2): 3.0, ("grow", 2): 2.9, ("scratch", 3): 2.7, ("grow", 3): 2.75,
              ("fixed_data", 3): 2.6}
    runs = []
    for (mode, i), loss in losses.items():
        X, name = params[i], f"{mode}-S{i}"
        total = 6 * X * 40 * X
        start = 0.0 if mode == "scratch" or i == 1 else 6 * params[i - 1] * 40 * params[i - 1]
        with open(run_dir / "runs" / f"{name}.jsonl", "w") as f:
            for step in range(1, 6):
                fl = start + (total - start) * step / 5
                f.write(json.dumps({"step": step, "tokens": step * 1000, "flops": fl, "loss": loss + 1 / step, "lr": 1e-3}) + "\n")
                f.write(json.dumps({"step": step, "flops": fl, "val_loss": loss + 0.8 / step, "val_bpb": 1.0}) + "\n")
        if with_ckpts:
            save_ckpt(tiny_model(seed=i, max_seq_len=96), run_dir / "runs" / f"{name}.pt")
        runs.append({"mode": mode, "stage": f"S{i}", "index": i - 1, "params": X, "model_config": {}, "tokens": 40 * X,
                     "flops": total, "val_loss": loss, "val_bpb": loss / 2, "ckpt": f"runs/{name}.pt",
                     "metrics": f"runs/{name}.jsonl"})
    with open(run_dir / "series.json", "w") as f:
        json.dump({"config": {}, "tokenizer": {"name": "bytes", "vocab_size": V}, "runs": runs}, f)


@pytest.mark.parametrize("root", ["grow", "scratch"])
def test_series_report_and_plot(tmp_path, root):
    write_series(tmp_path, root=root)
    text = report.series_report(str(tmp_path))
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 6 and "BPB" in table[0] and "ARC-e" not in table[0]
    first = "From Scratch (grown chain's start)" if root == "grow" else "From Scratch"
    assert [line.split("|")[2].strip() for line in table[2:]] == [first, "From Scratch", "Grown", "From Scratch",
                                                                   "Grown", "Grown w/ fixed data"]
    # each size from scratch: 2.4e12 + 9.6e12 + 3.84e13 = 5.04e13; the grown series: 3.84e13, 23.8% less
    assert "grown 3.84e+13 FLOPs" in text and "vs 5.04e+13 FLOPs for training each size from scratch (S1, S2, S3)" in text
    assert "23.8% saved" in text
    assert "- S2: Grown val loss 2.9000 <= From Scratch 3.0000: yes" in text
    assert "- S3: Grown val loss 2.7500 > From Scratch 2.7000: no" in text
    assert "- S3: Grown w/ fixed data val loss 2.6000 <= From Scratch 2.7000: yes" in text
    assert "- S1" not in text  # the chain's start is compared with nothing: it is the scratch run
    with_tasks = report.series_report(str(tmp_path), {"runs/grow-S3.pt": {"hellaswag": {"acc_norm": {"value": 0.71}}}})
    assert "HellaSwag" in with_tasks and "| 71.0 |" in with_tasks
    report.plot_series(str(tmp_path), str(tmp_path / "series.png"))
    from matplotlib.image import imread
    assert open(tmp_path / "series.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    img = imread(str(tmp_path / "series.png"))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300 and img[..., :3].std() > 0.05


def test_cli_report_with_tasks_and_fit(tmp_path):
    write_series(tmp_path, with_ckpts=True)
    out = subprocess.run([sys.executable, "eval.py", "--report", str(tmp_path), "--tasks", "arc_easy,lambada",
                          "--task_data", FIX, "--limit", "2", "--device", "cpu"], cwd=ROOT, env=CLI_ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.load(open(tmp_path / "eval.json"))
    assert set(res) == {f"runs/{m}-S{i}.pt" for m, i in [("grow", 1), ("scratch", 2), ("grow", 2), ("scratch", 3),
                                                           ("grow", 3), ("fixed_data", 3)]}
    md = open(tmp_path / "report.md").read()
    assert "ARC-e" in md and "LAMBADA" in md and md in out.stdout + "\n"
    assert os.path.getsize(tmp_path / "series.png") > 1000
    out = subprocess.run([sys.executable, "eval.py", "--fit", str(tmp_path)], cwd=ROOT, env=CLI_ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "scratch: loss law" in out.stdout and "grow: loss law" in out.stdout and "predicted" in out.stdout


def test_fit_series_predicts_an_exact_series(tmp_path):
    # four scratch members on an exact loss law; a PassUntil task whose instances each follow a task law
    N = [1e5, 2e5, 4e5, 8e5]
    E, A, alpha = 2.0, 40.0, 0.3
    inst = [(150.0, 0.4), (900.0, 0.5), (60.0, 0.3)]
    runs, results = [], {}
    for i, n in enumerate(N, 1):
        ckpt = f"s{i}.pt"
        runs.append({"mode": "scratch", "stage": f"S{i}", "index": i, "params": n, "flops": 1.0,
                     "val_loss": float(report.loss_law(n, E, A, alpha)), "ckpt": ckpt, "metrics": "m.jsonl"})
        results[ckpt] = {"lambada_pu": {"pass_until": {"value": 0.0}, "instances": [
            {"estimate": float(report.task_law(n, c, a))} for c, a in inst]}}
    with open(tmp_path / "series.json", "w") as f:
        json.dump({"config": {}, "runs": runs}, f)
    with open(tmp_path / "eval.json", "w") as f:
        json.dump(results, f)
    text = report.fit_series(str(tmp_path))
    pred, actual = map(float, re.search(r"predicted ([\d.]+), actual ([\d.]+)", text).groups())
    assert pred == pytest.approx(actual, abs=2e-4)
    m = re.search(r"actual ([\d.e-]+); task-level law .*; instance-level law ([\d.e-]+)", text)
    assert float(m.group(2)) == pytest.approx(float(m.group(1)), rel=1e-3)
    assert "grow: 0 members" in text


def test_loss_law_keeps_the_floor_non_negative():
    # three members whose unconstrained fit runs off to E << 0 (the CPU demo's scratch runs)
    from report import fit_loss_law
    E, A, alpha = fit_loss_law([100_672, 215_600, 443_232], [2.7403, 2.2494, 1.7107])
    assert E >= 0 and 0 < alpha < 4 and A > 0
    # and a law with a real floor is still recovered
    N = np.array([1e5, 2e5, 4e5, 8e5])
    E, A, alpha = fit_loss_law(N, 1.5 + 30.0 * N ** -0.3)
    assert abs(E - 1.5) < 1e-4 and abs(alpha - 0.3) < 1e-4
