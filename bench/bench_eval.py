"""
bench_eval.py: evaluation throughput (examples/s) of every eval.py task on this machine, and how it
grows with the batch size.

    python bench_eval.py [--threads 1] [--batch_sizes 1,4,16,64] [--n 32] [--device cpu]

Part 1 runs the real task code (eval.RUNNERS, eval.eval_valid) with the bytes tokenizer and the
"tiny" shape (d_model 128, 4 layers, context 256, vocab 320) on synthetic documents in each dataset's
schema, with the datasets' typical lengths in characters. Part 2 is the GPT-2-sized vocabulary
(50304) and context 1024 that the paper uses: tiktoken cannot fetch its files offline, so requests of
synthetic token ids with the typical token counts go straight to eval.score (the same scoring path,
without tokenization). Random weights: throughput does not depend on what the model knows.
"""

import argparse
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one folder up
import data
import eval as ev
from model import Llama, config_from_shape

# typical lengths in characters (context; each choice) of the evaluation sets, and choices per example
LENGTHS = {"arc_easy": (115, 25, 4), "arc_challenge": (140, 30, 4), "winogrande": (100, 7, 2), "piqa": (50, 100, 2),
           "openbookqa": (60, 20, 4), "hellaswag": (240, 110, 4), "lambada": (420, 0, 1), "wikitext": (20000, 0, 1)}
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so what out up more about into them "
         "river station water light energy plant animal bridge history morning village valley").split()


def text(rng, n_chars):
    out = []
    while sum(len(w) + 1 for w in out) < n_chars:
        out.append(rng.choice(WORDS))
    return " ".join(out)


def synthetic_docs(name, n, rng):
    ctx, choice, k = LENGTHS[name]
    docs = []
    for i in range(n):
        opts = [text(rng, choice) for _ in range(k)]
        labels = list("ABCD")[:k]
        if name in ("arc_easy", "arc_challenge"):
            docs.append({"question": text(rng, ctx) + "?", "choices": {"text": opts, "label": labels}, "answerKey": "A"})
        elif name == "openbookqa":
            docs.append({"question_stem": text(rng, ctx), "choices": {"text": opts, "label": labels}, "answerKey": "A"})
        elif name == "winogrande":
            half = text(rng, ctx // 2)
            docs.append({"sentence": half + " _ " + text(rng, ctx // 2) + ".", "option1": opts[0], "option2": opts[1], "answer": "1"})
        elif name == "piqa":
            docs.append({"goal": text(rng, ctx), "sol1": opts[0], "sol2": opts[1], "label": 0})
        elif name == "hellaswag":
            docs.append({"activity_label": "Cooking", "ctx_a": text(rng, ctx - 40), "ctx_b": text(rng, 30), "endings": opts, "label": "0"})
        elif name == "lambada":
            docs.append({"text": text(rng, ctx)})
        else:
            docs.append({"page": text(rng, ctx)})
    return docs


def example_tokens(tok, task, d):
    """Tokens the model reads for one example (all its requests, before truncation to the context)."""
    if task.kind == "choice":
        contexts, conts, _, _ = task.doc(d)
        return sum(len(tok.encode(c + x)) for c, x in zip(contexts, conts))
    return len(tok.encode(d.get("text") or d.get("page")))


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (on a shared 2-core machine 2 threads oversubscribe and run ~10x slower)")
    p.add_argument("--batch_sizes", default="1,4,16,64")
    p.add_argument("--n", type=int, default=32, help="examples per task (wikitext: n/8 pages, valid: n windows)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    rng = random.Random(0)
    tok = data.get_tokenizer("bytes")
    torch.manual_seed(0)
    model = Llama(config_from_shape("tiny")).to(a.device).eval()
    c = model.config
    print(f"torch {torch.__version__}, {a.threads} threads, device {a.device}; examples/s (higher is better)\n")
    print(f"## 1. bytes tokenizer, shape tiny (d_model {c.d_model}, {c.n_layers} layers, context {c.max_seq_len}, "
          f"vocab {c.vocab_size}), {model.num_params():,} non-embedding params; real task code")
    header = "| task | examples | tokens/example | " + " | ".join(f"bs={b}" for b in sizes) + " |"
    print(header + "\n|" + "---|" * (3 + len(sizes)))
    ev.score(model, [([1] * 40, 5)] * 4, progress=False, device=a.device)  # warm-up
    for name in LENGTHS:
        n = max(2, a.n // 8) if name == "wikitext" else a.n
        docs, task = synthetic_docs(name, n, rng), ev.TASKS[name]
        tokens = sum(example_tokens(tok, task, d) for d in docs) / n
        rates = [n / timed(lambda: ev.RUNNERS[task.kind](model, tok, docs, task=task, batch_size=b, device=a.device,
                                                         progress=False)) for b in sizes]
        print(f"| {name} | {n} | {tokens:.0f} | " + " | ".join(f"{r:.1f}" for r in rates) + " |")
    with tempfile.TemporaryDirectory() as tmp:  # valid: a prepared split of synthetic text
        os.makedirs(os.path.join(tmp, "src"))
        for i in range(4):
            with open(os.path.join(tmp, "src", f"{i}.txt"), "w") as f:
                f.write(text(rng, a.n * c.max_seq_len // 2 + 100))
        data.prepare(os.path.join(tmp, "src"), "bytes", os.path.join(tmp, "out"), val_fraction=0.5, num_workers=1)
        rates = [a.n / timed(lambda: ev.eval_valid(model, tok, os.path.join(tmp, "out"), limit=a.n, batch_size=b,
                                                   device=a.device, progress=False)) for b in sizes]
        print(f"| valid (windows) | {a.n} | {c.max_seq_len} | " + " | ".join(f"{r:.1f}" for r in rates) + " |")

    torch.manual_seed(0)
    model = Llama(config_from_shape("tiny", vocab_size=50304, max_seq_len=1024)).to(a.device).eval()
    print("\n## 2. GPT-2-sized vocabulary 50304, context 1024, shape tiny otherwise; synthetic token ids into eval.score")
    print(header + "\n|" + "---|" * (3 + len(sizes)))
    gen = torch.Generator().manual_seed(0)
    # typical GPT-2 token counts: (context, continuation, requests per example)
    for name, (ctx, cont, k) in {"arc_easy": (30, 6, 4), "hellaswag": (55, 25, 4), "lambada": (90, 2, 1),
                                 "wikitext/valid windows": (1, 1024, 1)}.items():
        n = max(2, a.n // 4) if "windows" in name else a.n
        reqs = [(torch.randint(0, 50257, (ctx + cont,), generator=gen).tolist(), cont) for _ in range(n * k)]
        rates = [n / timed(lambda: ev.score(model, reqs, batch_size=b, device=a.device, progress=False)) for b in sizes]
        print(f"| {name} | {n} | {k * (ctx + cont)} | " + " | ".join(f"{r:.1f}" for r in rates) + " |")


if __name__ == "__main__":
    main()
