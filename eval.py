"""
eval.py: evaluate checkpoints as the paper's Table 1 does (Yano et al. 2025, appendix B), PassUntil (Hu et al. 2024),
and the command line of the series report and scaling-law fits (their code is in report.py).

    python eval.py CKPT [CKPT ...] --tasks valid,wikitext,lambada,arc_easy,arc_challenge,winogrande,piqa,openbookqa,hellaswag
                   [--limit N] [--batch_size B] [--data_dir DIR] [--stride S] [--out results.json] [--device cpu|cuda]
                   [--task_data DIR | --task_data arc_easy=FILE.jsonl ...] [--pu_r 2 --pu_cap 64] [--samples FILE.jsonl]
    python eval.py --report RUN_DIR [--tasks ...]    # RUN_DIR/report.md (Table 1), RUN_DIR/series.png (Figure 2)
    python eval.py --fit RUN_DIR                     # fit scaling laws on the smaller members, predict the largest

A CKPT is a nanogrow checkpoint (.pt) or a Hugging Face folder (hf.py export-hf writes one), scored with the
folder's own tokenizer. The table has one row per checkpoint; --out writes {ckpt: {task: {metric: {"value", "stderr",
"n"}}}}; --samples writes a JSON line per document with its requests and their scores (the harness's --log_samples).

Zero-shot scoring follows lm-evaluation-harness (EleutherAI; its task YAMLs under lm_eval/tasks and
the HFLM loglikelihood code): a request is (context, continuation); the two are tokenized as one string
and split where the context's tokens end; the continuation's log-probs given everything before it are
summed. Multiple choice: acc = argmax of the sums, acc_norm = argmax of sum / characters of the choice.
Every task's data comes through `datasets` with the harness's ids, or from a local jsonl/parquet file in
the same schema (tests/fixtures/eval/ holds a few rows of each). Stderr: the harness's for accuracies;
the delta method for perplexities and bits per byte (the harness bootstraps LAMBADA's, gives none for WikiText).
"""

import argparse
import contextlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from checkpoint import load_checkpoint, model_from_checkpoint
from common import CheckpointError, ConfigError, require, use_tf32
from hf import import_hf
from report import fit_series, load_eval, load_series, markdown_table, number, plot_series, series_report


def load_model(path, device="cpu"):
    """(Llama in eval mode, data.Tokenizer) from a checkpoint file or a Hugging Face folder. A folder is scored with
    its own tokenizer (hf.import_hf): one of nanogrow's, never one guessed from the vocabulary size."""
    path = os.fspath(path)
    if os.path.isdir(path):
        model, tokenizer = import_hf(path)
    else:
        ckpt = load_checkpoint(path)
        model, tokenizer = model_from_checkpoint(ckpt), ckpt["tokenizer"]
    tok = data.get_tokenizer(tokenizer["name"] if isinstance(tokenizer, dict) else tokenizer)
    if tok.n_used > model.config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer {tok.name} uses {tok.n_used} ids but the model has only {model.config.vocab_size}")
    return model.to(device).eval(), tok


# -----------------------------------------------------------------------------
# 1. Scoring token sequences: the one place the model runs for log-likelihoods


def encode_pair(tok, context, continuation):
    """(context ids, continuation ids) as the harness's _encode_pair: trailing spaces of the context move
    onto the continuation, whole = tok(context + continuation) and the continuation is what follows
    len(tok(context)) tokens of it (a BPE merge across the boundary stays with the continuation).
    An empty context is the end-of-text token, as the harness's prefix_token_id."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        return [tok.eot_id], tok.encode(continuation)
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def make_request(ctx, cont, max_len):
    """(tokens, n): score the last n tokens given the ones before. Too long for the model: the context
    is cut from the left, as the harness does ((context + continuation)[-(max_length + 1):])."""
    if not 0 < len(cont) <= max_len:
        raise ConfigError(f"a continuation of {len(cont)} tokens cannot be scored with max_seq_len={max_len}")
    return (ctx + cont)[-(max_len + 1):], len(cont)


def rolling_windows(n_tokens, max_len, context_len=1):
    """Windows (start, end, n_pred) over a sequence `full` of 1 + n_tokens ids whose first id is only
    context: full[start:end] is one request and its last n_pred tokens are scored. Every token after the
    first is scored exactly once. This is the harness's get_rolling_token_windows followed by
    make_disjoint_window, in index form: the first window predicts min(max_len, n) tokens from the prefix
    on; each later one predicts max_len - context_len + 1 new tokens and fills its max_len inputs with
    the tokens before them (context_len=1, the harness's choice: disjoint windows; larger means overlap,
    i.e. a stride of max_len - context_len + 1 and every token with at least context_len tokens before it)."""
    if not 1 <= context_len <= max_len:
        raise ConfigError(f"context_len must be in [1, {max_len}], got {context_len}")
    if n_tokens <= 0:
        return []
    first = min(max_len, n_tokens)
    windows, done = [(0, first + 1, first)], first
    while done < n_tokens:
        n = min(n_tokens - done, max_len - context_len + 1)
        end = done + n  # tokens are full[1:], so predicted token j is full[j + 1]
        windows.append((end - max_len, end + 1, n))
        done = end
    return windows


@torch.no_grad()
def score(model, requests, batch_size=16, device="cpu", desc="scoring", progress=True):
    """[(sum of log-probs of the scored tokens, every scored token is the argmax)] for requests
    (tokens, n), in the order given. Requests are run longest first (as the harness: the first batch is
    the largest, so running out of memory shows at once) and right-padded: with causal attention a
    padded position never changes an earlier one, so the scores do not depend on the batch size."""
    device = torch.device(device)
    max_len = model.config.max_seq_len
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    out = [None] * len(requests)
    # bf16 autocast on CUDA (the model normalizes in fp32 and the log-softmax below is fp32)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    bar = tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        T = len(requests[rows[0]][0]) - 1
        if T > max_len:
            raise ConfigError(f"request of {T + 1} tokens is longer than max_seq_len + 1 = {max_len + 1}")
        x = torch.zeros(len(rows), T, dtype=torch.long)
        y = torch.zeros(len(rows), T, dtype=torch.long)
        scored = torch.zeros(len(rows), T, dtype=torch.bool)
        for r, i in enumerate(rows):
            tokens, n = requests[i]
            t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
            x[r, :len(t) - 1], y[r, :len(t) - 1] = t[:-1], t[1:]
            scored[r, len(t) - 1 - n:len(t) - 1] = True
        x, y, scored = x.to(device), y.to(device), scored.to(device)
        with autocast:
            logits, _ = model(x)
        picked = logits[scored]  # (scored positions, vocab), row by row: the log-softmax runs only where needed
        picked = picked.float() if picked.dtype in (torch.float16, torch.bfloat16) else picked
        target, row_of = y[scored], scored.nonzero()[:, 0]
        logp = F.log_softmax(picked, dim=-1).gather(-1, target[:, None])[:, 0].double()
        misses = (picked.argmax(dim=-1) != target).long()
        # per-row sums on the device, then one transfer (no synchronization per row)
        sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_of, logp).tolist()
        greedy = (torch.zeros(len(rows), dtype=torch.long, device=device).index_add_(0, row_of, misses) == 0).tolist()
        for i, s, g in zip(rows, sums, greedy):
            out[i] = (s, g)
        bar.update(len(rows))
    bar.close()
    return out


# -----------------------------------------------------------------------------
# 2. Statistics: each metric is {"value", "stderr", "n"}


def _clean(x):
    return None if x is None or not math.isfinite(x) else float(x)


def mean_metric(xs):
    """Mean with the harness's stderr for acc: sample standard deviation / sqrt(n) (metrics.mean_stderr);
    for a 0/1 vector of mean p that is sqrt(p (1 - p) / (n - 1))."""
    xs = np.asarray(xs, dtype=np.float64)
    se = xs.std(ddof=1) / math.sqrt(len(xs)) if len(xs) > 1 else None
    return {"value": float(xs.mean()), "stderr": _clean(se), "n": len(xs)}


def ratio(num, den):
    """sum(num) / sum(den) over independent units (examples, documents, windows) and its standard error
    by the delta method: sqrt(sum((num_i - r den_i)^2) / (n (n - 1))) / mean(den). The harness bootstraps
    LAMBADA's perplexity and gives WikiText's none; the delta method is the closed form of the same thing."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    r, n = num.sum() / den.sum(), len(num)
    se = math.sqrt(((num - r * den) ** 2).sum() / (n * (n - 1))) / den.mean() if n > 1 else None
    return r, se


def perplexity_metric(nll, den):
    """exp(sum nll / sum den) with stderr exp(r) * se(r) (delta method again)."""
    r, se = ratio(nll, den)
    return {"value": math.exp(r), "stderr": _clean(math.exp(r) * se if se is not None else None), "n": len(nll)}


def bpb_metric(nll, den, tokens_per_byte=1.0):
    r, se = ratio(nll, den)
    k = tokens_per_byte / math.log(2)
    return {"value": r * k, "stderr": _clean(se * k if se is not None else None), "n": len(nll)}


# -----------------------------------------------------------------------------
# 3. Tasks: dataset ids, splits and prompts of lm-evaluation-harness's YAMLs


def mc(context, choices, gold):
    """One context, one continuation per choice with the target_delimiter " " in front; acc_norm divides
    by the length of the choice itself (task.py: completion_len = len(choice), without the delimiter)."""
    return [context] * len(choices), [" " + c for c in choices], gold, [len(c) for c in choices]


def arc_doc(d):  # arc/arc_easy.yaml (arc_challenge.yaml includes it)
    return mc(f"Question: {d['question']}\nAnswer:", list(d["choices"]["text"]), list(d["choices"]["label"]).index(d["answerKey"]))


def piqa_doc(d):  # piqa/piqa.yaml
    return mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))


def openbookqa_doc(d):  # openbookqa/openbookqa.yaml: the bare question stem, answerKey.lstrip()
    return mc(d["question_stem"], list(d["choices"]["text"]), list(d["choices"]["label"]).index(d["answerKey"].lstrip()))


def hellaswag_clean(text):
    # hellaswag/utils.py preprocess: the brackets are WikiHow artifacts
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(d):  # hellaswag/utils.py process_docs
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return mc(hellaswag_clean(d["activity_label"] + ": " + ctx), [hellaswag_clean(e) for e in d["endings"]], int(d["label"]))


def winogrande_doc(d):
    # winogrande/preprocess_winogrande.py, "partial evaluation": each option is put in the blank and
    # makes the context; the shared continuation is what follows the blank. No acc_norm in the YAML.
    i = d["sentence"].index("_")
    contexts = [d["sentence"][:i] + opt for opt in (d["option1"], d["option2"])]
    target = " " + d["sentence"][i + 1:].strip()
    return contexts, [target, target], int(d["answer"]) - 1, [len(c) for c in contexts]  # lengths unused


def lambada_split(text):
    # lambada/lambada_openai.yaml: text.split(' ')[:-1] joined as the context, ' ' + the last word
    context, _, word = text.rpartition(" ")
    return context, " " + word


def wikitext_detokenize(s):
    """wikitext/preprocess_wikitext.py wikitext_detokenizer: undo WikiText's tokenized spacing."""
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" " + chr(176) + " ", chr(176)),
                 (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(a, b)
    return s


@dataclass
class Task:
    path: str  # the harness's dataset_path (a Hugging Face dataset id)
    config: str  # its dataset_name
    split: str  # the split the harness evaluates
    kind: str  # "choice", "lambada", "rolling", "pass_until"
    doc: object = None  # choice tasks: doc -> (contexts, continuations, gold, lengths for acc_norm)
    norm: bool = False  # the YAML lists acc_norm
    file: str = ""  # name of the local file in a --task_data folder (default: the task's name)


TASKS = {
    "wikitext": Task("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test", "rolling"),
    "lambada": Task("EleutherAI/lambada_openai", "default", "test", "lambada"),
    "arc_easy": Task("allenai/ai2_arc", "ARC-Easy", "test", "choice", arc_doc, True),
    "arc_challenge": Task("allenai/ai2_arc", "ARC-Challenge", "test", "choice", arc_doc, True),
    "winogrande": Task("allenai/winogrande", "winogrande_xl", "validation", "choice", winogrande_doc),
    "piqa": Task("baber/piqa", None, "validation", "choice", piqa_doc, True),
    "openbookqa": Task("allenai/openbookqa", "main", "test", "choice", openbookqa_doc, True),
    "hellaswag": Task("Rowan/hellaswag", None, "validation", "choice", hellaswag_doc, True),
    # not in the harness: LAMBADA's last word as a generative task, measured by PassUntil (Hu et al. 2024)
    "lambada_pu": Task("EleutherAI/lambada_openai", "default", "test", "pass_until", file="lambada"),
}
PAPER_TASKS = ["valid", "wikitext", "lambada", "arc_easy", "arc_challenge", "winogrande", "piqa", "openbookqa", "hellaswag"]


def read_rows(path):
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # comes with datasets
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            return json.load(f)
        return [json.loads(line) for line in f if line.strip()]


def load_docs(name, source=None, limit=None):
    """The task's documents (dicts in the dataset's schema): from `source` (a .jsonl/.json/.parquet file, or
    a folder holding NAME.jsonl / .parquet / .json) or else from the hub. limit keeps the first N, as the
    harness's --limit does."""
    task = TASKS[name]
    if source is None:
        import datasets  # imported only here: it is slow to import and the tests never reach the hub
        try:
            ds = datasets.load_dataset(task.path, task.config, split=task.split)
        except Exception as e:  # offline, no such dataset, ...: one line, and the way around it
            raise ConfigError(f"could not load {task.path} ({task.config}, {task.split}) through datasets "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); without the hub, "
                            f"give --task_data {name}=FILE.jsonl (or a folder) in the same schema") from None
        ds = ds.select(range(min(limit, len(ds)))) if limit is not None else ds
        return [dict(d) for d in ds]
    if os.path.isdir(source):
        found = [os.path.join(source, (task.file or name) + ext) for ext in (".jsonl", ".parquet", ".json")]
        found = [f for f in found if os.path.exists(f)]
        if not found:
            raise ConfigError(f"{source} has no {task.file or name}.jsonl, .parquet or .json for task {name}")
        source = found[0]
    if not os.path.exists(source):
        raise ConfigError(f"task data {source} not found")
    return read_rows(source)[:limit]


# -----------------------------------------------------------------------------
# 4. Running a task: each returns ({metric: {"value", "stderr", "n"}}, per-document details)


def eval_choice(model, tok, docs, task, **kw):
    parsed = [task.doc(d) for d in docs]
    L = model.config.max_seq_len
    requests = [make_request(*encode_pair(tok, c, x), L) for ctxs, conts, _, _ in parsed for c, x in zip(ctxs, conts)]
    scores = iter(score(model, requests, **kw))
    acc, acc_norm, details = [], [], []
    for ctxs, conts, gold, lengths in parsed:
        lls, greedy = zip(*[next(scores) for _ in conts])
        lls = np.array(lls)
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / np.array(lengths, dtype=np.float64)))
        acc.append(pred == gold)
        acc_norm.append(pred_norm == gold)
        details.append({"arguments": [[c, x] for c, x in zip(ctxs, conts)], "lls": lls.tolist(), "greedy": list(greedy),
                        "gold": gold, "pred": pred, "pred_norm": pred_norm, "answer": conts[pred], "acc": pred == gold,
                        **({"acc_norm": pred_norm == gold} if task.norm else {})})
    metrics = {"acc": mean_metric(acc)}
    if task.norm:
        metrics["acc_norm"] = mean_metric(acc_norm)
    return metrics, details


def eval_lambada(model, tok, docs, task=None, **kw):
    # the word counts only if every one of its tokens is the greedy choice; perplexity = exp(-mean ll)
    pairs = [lambada_split(d["text"]) for d in docs]
    requests = [make_request(*encode_pair(tok, *pair), model.config.max_seq_len) for pair in pairs]
    scores = score(model, requests, **kw)
    lls = [s for s, _ in scores]
    return ({"acc": mean_metric([g for _, g in scores]), "perplexity": perplexity_metric([-x for x in lls], np.ones(len(lls)))},
            [{"arguments": [list(pair)], "ll": s, "greedy": g, "acc": g} for pair, (s, g) in zip(pairs, scores)])


def eval_rolling(model, tok, docs, task=None, **kw):
    # WikiText: the detokenized page is scored with disjoint windows after an end-of-text prefix; words
    # and bytes are counted on the ORIGINAL page (preprocess_wikitext.process_results)
    L = model.config.max_seq_len
    requests, owner = [], []
    for k, d in enumerate(docs):
        full = [tok.eot_id] + tok.encode(wikitext_detokenize(d["page"]))
        for a, b, n in rolling_windows(len(full) - 1, L):
            requests.append((full[a:b], n))
            owner.append(k)
    nll = np.zeros(len(docs))
    for k, (s, _) in zip(owner, score(model, requests, **kw)):
        nll[k] -= s
    windows = np.bincount(owner, minlength=len(docs)) if owner else np.zeros(len(docs), dtype=int)
    words = [len(re.split(r"\s+", d["page"])) for d in docs]
    nbytes = [len(d["page"].encode("utf-8")) for d in docs]
    return ({"word_perplexity": perplexity_metric(nll, words), "byte_perplexity": perplexity_metric(nll, nbytes),
             "bits_per_byte": bpb_metric(nll, nbytes)},
            [{"nll": float(x), "words": w, "bytes": b, "windows": int(n)} for x, w, b, n in zip(nll, words, nbytes, windows)])


def eval_valid(model, tok, data_dir, stride=None, limit=None, **kw):
    """Perplexity of a prepared validation split (data.load_prepared) in windows of max_seq_len. The first
    token is context only; the default stride (= max_seq_len) gives exactly the rows of data.val_batches,
    a smaller stride scores each token once with at least max_seq_len - stride tokens before it.
    Bits per byte converts the mean loss with the split's tokens per byte (meta.json)."""
    tokens, meta = data.load_prepared(data_dir, "val")
    data.check_tokenizer(meta, tok.name, tok.vocab_size)
    L = model.config.max_seq_len
    if not 1 <= (stride or L) <= L:
        raise ConfigError(f"--stride must be in [1, max_seq_len={L}], got {stride}")
    windows = rolling_windows(len(tokens) - 1, L, context_len=L - (stride or L) + 1)[:limit]
    if not windows:
        raise ConfigError(f"{data_dir}: the val split has {len(tokens)} tokens; at least 2 are needed")
    scores = score(model, [(tokens[a:b], n) for a, b, n in windows], **kw)
    nll, counts = [-s for s, _ in scores], [n for _, _, n in windows]
    split = meta["splits"]["val"]
    r, se = ratio(nll, counts)
    return ({"perplexity": perplexity_metric(nll, counts), "loss": {"value": r, "stderr": _clean(se), "n": len(nll)},
             "bits_per_byte": bpb_metric(nll, counts, split["tokens"] / split["bytes"])},
            [{"start": a, "nll": x, "tokens": n} for (a, _, _), x, n in zip(windows, nll, counts)])


# -----------------------------------------------------------------------------
# 5. PassUntil (Hu et al. 2024, "Predicting Emergent Abilities with Infinite Resolution Evaluation"): sample until r passes, to measure pass rates far below 1/(samples one can afford)


@dataclass
class PassUntilResult:
    passes: int
    attempts: int
    capped: bool  # stopped at the cap with fewer than r passes
    estimate: float


def pass_until(sample_fn, check_fn, r=2, cap=1000, batch=1):
    """Draw samples (sample_fn(k) -> list of k samples) in order and stop at the r-th pass or after cap
    attempts. The attempts K to the r-th pass are negative binomial, and (r - 1) / (K - 1) is the unbiased
    estimator of the pass rate for r >= 2; r / K (and 1 / K for r = 1) is biased high, as the test shows.
    When capped, passes / attempts is reported with capped=True (a coarser, censored value). Samples
    are drawn `batch` at a time (one model call); those after the stopping point are ignored, so the
    stopping time is that of drawing one by one."""
    if r < 1 or cap < r:
        raise ConfigError(f"pass_until needs r >= 1 and cap >= r, got r={r}, cap={cap}")
    passes = attempts = 0
    while passes < r and attempts < cap:
        for sample in sample_fn(min(batch, cap - attempts)):
            attempts += 1
            passes += bool(check_fn(sample))
            if passes == r:
                break
    if passes < r:
        return PassUntilResult(passes, attempts, True, passes / attempts)
    return PassUntilResult(passes, attempts, False, (r - 1) / (attempts - 1) if r >= 2 else 1 / attempts)


def model_pass_until(model, tok, prompt, check_fn, r=2, cap=64, max_new_tokens=16, temperature=1.0, top_k=None,
                     batch=16, seed=0, device="cpu"):
    """pass_until with samples from the model: prompt -> model.generate (sampling) -> decoded text up to
    the end-of-text token -> check_fn(text)."""
    L = model.config.max_seq_len
    ids = tok.encode(prompt)[-(L - max_new_tokens):]
    gen = torch.Generator(device).manual_seed(seed)

    def sample(k):
        x = torch.tensor([ids] * k, dtype=torch.long, device=device)
        out = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=tok.eot_id, generator=gen)
        rows = [row[len(ids):] for row in out.tolist()]
        return [tok.decode(row[:row.index(tok.eot_id)] if tok.eot_id in row else row) for row in rows]
    return pass_until(sample, check_fn, r, cap, batch)


def eval_lambada_pu(model, tok, docs, task=None, r=2, cap=64, batch_size=16, device="cpu", progress=True, desc=None, seed=0):
    """LAMBADA as a generative task: sample the continuation; a pass is text that starts with the
    word and does not go on with a letter or digit. One PassUntil estimate per document."""
    details = []
    for k, d in enumerate(tqdm(docs, desc=desc, file=sys.stderr, disable=not progress, leave=False)):
        context, target = lambada_split(d["text"])
        n_new = len(encode_pair(tok, context, target)[1]) + 1  # one token more shows whether the word ends

        def check(text, target=target):
            return text.startswith(target) and not text[len(target):len(target) + 1].isalnum()
        res = model_pass_until(model, tok, context, check, r, cap, n_new, batch=batch_size, seed=seed + k, device=device)
        details.append({**res.__dict__, "arguments": [[context, target]]})
    return ({"pass_until": mean_metric([x["estimate"] for x in details]),
             "capped": mean_metric([x["capped"] for x in details])}, details)


RUNNERS = {"choice": eval_choice, "lambada": eval_lambada, "rolling": eval_rolling, "pass_until": eval_lambada_pu}


def evaluate(model, tok, tasks, task_data=None, limit=None, batch_size=16, device="cpu", data_dir=None, stride=None,
             pu_r=2, pu_cap=64, progress=True, samples=None):
    """{task: {metric: {"value", "stderr", "n"}}} for one model. task_data: {task or "*": file or folder}.
    PassUntil tasks also keep "instances": the per-document results (for --fit's instance-level law).
    samples: a list that gets one record per document (per window for valid), {"task", "doc_id", ...}: the
    requests ("arguments": [context, continuation] pairs as the harness logs them), each one's summed
    log-likelihood and greedy flag, the gold and chosen answers; what lm-evaluation-harness's --log_samples keeps."""
    results, task_data = {}, task_data or {}
    unknown = [t for t in tasks if t != "valid" and t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}: choose from valid, {', '.join(TASKS)}")
    for name in tasks:
        kw = dict(batch_size=batch_size, device=device, progress=progress, desc=name)
        if name == "valid":
            if not data_dir:
                raise ConfigError("task valid needs --data_dir (a folder made by data.py prepare)")
            results[name], details = eval_valid(model, tok, data_dir, stride, limit, **kw)
            if samples is not None:
                samples.extend({"task": name, "doc_id": i, **d} for i, d in enumerate(details))
            continue
        task = TASKS[name]
        docs = load_docs(name, task_data.get(name, task_data.get("*")), limit)
        if task.kind == "pass_until":
            kw.update(r=pu_r, cap=pu_cap)
        metrics, details = RUNNERS[task.kind](model, tok, docs, task=task, **kw)
        if samples is not None:
            samples.extend({"task": name, "doc_id": i, **d} for i, d in enumerate(details))
        instances = [{k: v for k, v in d.items() if k != "arguments"} for d in details]
        results[name] = {**metrics, **({"instances": instances} if task.kind == "pass_until" else {})}
    return results


# -----------------------------------------------------------------------------
# 6. Command line


def series_val_dir(cfg):
    """The prepared folder a series validated on, as train.py finds it: data_dir/NAME-TOKENIZER of its
    one data source (data.default_out_dir). None for a mixture: say --data_dir then."""
    sources, root = cfg.get("data") or [], cfg.get("data_dir") or "data_cache"
    if len(sources) != 1:
        return None
    return os.path.join(root, os.path.basename(data.default_out_dir(sources[0], cfg.get("tokenizer", "bytes"))))


PERCENT = ("acc", "acc_norm", "pass_until", "capped")


def results_table(results):
    """One row per checkpoint, one column per task metric; accuracies in %."""
    cols = []
    for per_task in results.values():
        for task, metrics in per_task.items():
            cols += [(task, m) for m, v in metrics.items() if isinstance(v, dict) and "value" in v and (task, m) not in cols]
    rows = []
    for ckpt, per_task in results.items():
        row = [ckpt]
        for task, m in cols:
            v = per_task.get(task, {}).get(m)
            row.append("-" if v is None else f"{100 * v['value']:.1f}" if m in PERCENT else number(v["value"]))
        rows.append(row)
    return markdown_table(["checkpoint"] + [f"{t} {m}{' %' if m in PERCENT else ''}" for t, m in cols], rows)


def parse_task_data(items):
    out = {}
    for item in items:
        name, eq, path = item.partition("=")
        if eq and name in TASKS:
            out[name] = path
        elif not eq:
            out["*"] = item  # a folder (or file) for every task
        else:
            raise ConfigError(f"--task_data {item}: unknown task {name!r}")
    return out


def open_samples(path):
    """The --samples file, opened (and emptied) before anything is evaluated, so a bad path costs no evaluation."""
    if not path:
        return None
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--samples {path}: cannot write there ({e.strerror or e})") from None


def write_samples(f, ckpt, samples):
    """One JSON line per record, each naming its model, written after each model (a crash keeps the others)."""
    if f is None:
        return
    for record in samples:
        f.write(json.dumps({"model": ckpt, **record}, ensure_ascii=False) + "\n")
    f.flush()


def check_args(a):
    """eval.py's numbers, before a checkpoint or task is read: one ConfigError line naming the first bad one."""
    require(a.batch_size >= 1, "--batch_size", a.batch_size, "an integer >= 1")
    require(a.limit is None or a.limit >= 1, "--limit", a.limit, "an integer >= 1 (leave it out for every document)")
    require(a.stride is None or a.stride >= 1, "--stride", a.stride, "an integer >= 1, at most the model's max_seq_len")
    require(a.pu_r >= 1, "--pu_r", a.pu_r, "an integer >= 1 (the passes PassUntil waits for)")
    require(a.pu_cap >= a.pu_r, "--pu_cap", a.pu_cap, f"an integer >= --pu_r ({a.pu_r}): the most attempts per instance")


def main(argv=None):
    p = argparse.ArgumentParser(description="evaluate nanogrow checkpoints; report or fit a series")
    p.add_argument("ckpts", nargs="*", help="checkpoint files or exported HF folders")
    p.add_argument("--tasks", default=None, help=f"comma list from: valid, {', '.join(TASKS)} (default: the paper's "
                   "tasks; valid only with --data_dir)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (windows for valid)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--data_dir", default=None, help="prepared data (data.py prepare) whose val split the valid task "
                   "scores (--report: by default the folder train.py (run by series.py) prepared for the series' one source)")
    p.add_argument("--stride", type=int, default=None, help="valid: tokens newly scored per window (default max_seq_len)")
    p.add_argument("--task_data", action="append", default=[], help="TASK=FILE, or a folder of TASK.jsonl/.parquet (repeatable)")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--samples", metavar="FILE", default=None, help="write one JSON line per document (per window for "
                   "valid): its requests (context, continuation), their log-likelihoods and greedy flags, the gold and "
                   "chosen answers (as lm-evaluation-harness's --log_samples)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pu_r", type=int, default=2, help="PassUntil: passes to wait for")
    p.add_argument("--pu_cap", type=int, default=64, help="PassUntil: most attempts per instance")
    p.add_argument("--report", metavar="RUN_DIR", help="write RUN_DIR/report.md and series.png (evaluating --tasks first)")
    p.add_argument("--fit", metavar="RUN_DIR", help="fit the scaling laws on a series and predict its largest member")
    a = p.parse_args(argv)
    samples_file = None
    try:
        check_args(a)
        use_tf32(a.device)  # float32 matmuls on TF32 tensor cores
        if a.fit:
            print(fit_series(a.fit))
            return
        tasks = a.tasks.split(",") if a.tasks else [t for t in PAPER_TASKS if t != "valid" or a.data_dir]
        kw = dict(task_data=parse_task_data(a.task_data), limit=a.limit, batch_size=a.batch_size, device=a.device,
                  stride=a.stride, pu_r=a.pu_r, pu_cap=a.pu_cap)
        samples_file = open_samples(a.samples)
        if a.report:
            series = load_series(a.report)
            results = load_eval(a.report)
            if a.tasks:
                data_dir = a.data_dir or series_val_dir(series.get("config", {}))
                for r in series["runs"]:
                    model, tok = load_model(os.path.join(a.report, r["ckpt"]), a.device)
                    print(f"evaluating {r['ckpt']}", file=sys.stderr)
                    samples = [] if samples_file else None
                    results[r["ckpt"]] = {**results.get(r["ckpt"], {}), **evaluate(model, tok, tasks, data_dir=data_dir,
                                                                                   samples=samples, **kw)}
                    write_samples(samples_file, r["ckpt"], samples)
                    with open(os.path.join(a.report, "eval.json"), "w") as f:  # after each run: a crash keeps the rest
                        json.dump(results, f, indent=1)
            report = series_report(a.report, results)
            with open(os.path.join(a.report, "report.md"), "w") as f:
                f.write(report)
            plot_series(a.report, os.path.join(a.report, "series.png"))
            print(report)
            print(f"wrote {os.path.join(a.report, 'report.md')} and {os.path.join(a.report, 'series.png')}", file=sys.stderr)
            return
        if not a.ckpts:
            p.error("give checkpoints, --report RUN_DIR or --fit RUN_DIR")
        results = {}
        for ckpt in a.ckpts:
            model, tok = load_model(ckpt, a.device)
            samples = [] if samples_file else None
            results[ckpt] = evaluate(model, tok, tasks, data_dir=a.data_dir, samples=samples, **kw)
            write_samples(samples_file, ckpt, samples)
        print(results_table(results))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if samples_file:
            samples_file.close()


if __name__ == "__main__":
    main()
