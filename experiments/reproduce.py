"""
reproduce.py: the claims of Yano et al. 2025 measured at CPU scale as a researcher would: the paper's recipe and
baseline beside nanogrow's, several seeds with intervals, the paper's 40 tokens per parameter, every member a
finished model. One command, resumable; the report sets nanogrow's numbers beside the paper's.

    python experiments/reproduce.py configs/reproduce_cpu.py --estimate            # the plan and its CPU time, nothing run
    python experiments/reproduce.py configs/reproduce_cpu.py --docs_dir=docs --jobs=2
    python experiments/reproduce.py configs/reproduce_cpu.py --docs_dir=docs --jobs=2 --resume   # after a kill, or
    python experiments/reproduce.py configs/reproduce_cpu.py --seeds=[1337] --resume               # a part at a time

The grid: for every seed (the seed changes the initialization, the data order and the growth noise) and both
recipes, series.py runs at tokens_per_param (40: 2x Chinchilla, section 3.3), each in OUT/s<seed>/<part>:

    <recipe>            the grown series, every size from scratch at its own rate (nanogrow's equal-rate
                        comparison), and fixed data: the grown series with unique tokens capped at the largest scratch
                        run's (section 3.3; with these sizes the cap binds at the last stage alone)
    <recipe>_top_rate   every smaller size from scratch at the largest member's rate (the paper's comparison: it trains
                        every scratch model at 3e-4, its 8B rate; the largest scratch run is the same in both)
    paper_one_rate      Table 4 / Appendix C: the paper's recipe with every stage at the largest member's rate

The two recipes (the report names the source of each setting):
    paper     bert2BERT FPI width and trained layers stacked upward in bert2BERT's order (section 2.2: grow_depth
              stack_top), a cosine per stage to min_lr (every member finished, as the paper evaluates them); the paper
              leaves open the schedule per stage, the symmetry-breaking noise (1e-3 here), the optimizer state after
              growth (a fresh AdamW) and a warmup after growth (20 steps): nanogrow's choices
    nanogrow  series.py's best (docs/ablation.md: zero-sum noise 0.3, zero-initialized layers, no re-warmup) with
              every member finished by grow_schedule 'wsd': a trunk at each stage's stable rate and a cooldown branch
              at each member (MiniCPM's WSD, Hu et al. 2024, section 4), the branches' FLOPs counted in the series'
              cost; its scratch baselines are WSD runs cooling down over the same fraction

Then SFT and DPO of every grown, scratch and fixed-data member (Table 2) and two held-out multiple-choice tasks
(Table 1's downstream columns). Every claim is read over the seeds: mean ± sd per cell, the paired grown − scratch
difference with a 95% t interval, and a verdict: held (the interval is on the claim's side of its bound), not held
(on the other side), inconclusive (it straddles the bound), or not measurable at this scale (every model within two
standard errors of chance).

Nothing is downloaded: the data is the embedded corpus (data.default_corpus, Python's documentation). Every
heldout_every-th document is held out of pretraining and makes the tasks (no model saw them):
  - "continuation" (HellaSwag-like): a held-out document's opening lines; which of 4 next lines is its own?
  - "doc_name": a held-out function's signature; which of 4 first sentences of documentation belongs to it?
Post-training asks about the functions of the pretraining documents (Table 2 measures instruction following on
the training distribution): "What does NAME do?" answered with NAME's first sentence; DPO prefers that sentence to
a corrupted copy of it (words swapped: the preferred side is learnable). Every posttrain_heldout_every-th function
is held out of SFT and DPO and scores them: held-out SFT loss, DPO reward accuracy (chance 50%) and margin. (The
paper's MT-Bench needs a judge model: judge.py, given a URL.)
"""

import json
import math
import multiprocessing
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one folder up
import data
import eval as evaluation
import posttrain
import report
import series
from checkpoint import claim_grid
from common import at_least, above, cli_errors, configure, fmt_time, make_optimizer, read_jsonl, require, rule
from model import Llama, config_from_shape

AT_LEAST_1 = at_least(1, "an integer >= 1")
RECIPES = ("paper", "nanogrow")
# the members: small enough that the whole grown series reads the corpus's pretraining split at most once at 40
# tokens per parameter (budget.py's micro shapes); rates fall with size as in section 3.5 (values nanogrow's:
# the CPU demo's, continued down in size)
MEMBERS = [dict(name="12K", shape="micro-1", lr=6e-3), dict(name="24K", shape="micro-2", lr=5e-3),
           dict(name="46K", shape="micro-3", lr=4e-3), dict(name="82K", shape="micro-4", lr=3e-3)]
PAPER_RECIPE = ["--grow_width=fpi", "--grow_depth=stack_top", "--grow_schedule=restart", "--grow_noise=1e-3",
                "--grow_optimizer=fresh", "--grow_warmup_steps=20"]
NANOGROW_RECIPE = ["--grow_width=fpi", "--grow_depth=zero", "--grow_schedule=wsd", "--decay_frac=0.2", "--grow_noise=0.3",
                   "--grow_optimizer=fresh", "--grow_warmup_steps=0"]
# where each recipe setting comes from: the paper states these (the rest are nanogrow's choices)
PAPER_STATES = {"grow_width": "section 2.2: bert2BERT's FPI widens the hidden dims",
                "grow_depth": "section 2.2: trained layers stacked upward (bert2BERT's order: stack_top)"}


def is_args(v):
    return all(isinstance(a, str) and a.startswith("--") and "=" in a for a in v)


@dataclass
class ReproduceConfig:
    out_dir: str = "out/reproduce"
    docs_dir: str = ""  # also write reproduction.md and its figures here ("docs" for the committed copy)
    series: str = "configs/series_cpu.py"  # the base series: batch, context, warmup, evaluation (stages replaced below)
    stages: list = field(default_factory=lambda: [dict(s) for s in MEMBERS])  # the members, smallest first
    tokens_per_param: float = field(default=40.0, metadata=above(0))
    # every part runs once per seed: the seed changes initialization, data order and growth noise
    seeds: list = field(default_factory=lambda: [1337, 7, 42, 1, 2], metadata=rule(
        lambda v: len(v) >= 1 and len(set(v)) == len(v) and all(isinstance(s, int) and s >= 0 for s in v),
        "a list of distinct integers >= 0 (3 or more for an interval)"))
    # each recipe: series.py settings (--key=value), applied over the base config
    paper_recipe: list = field(default_factory=lambda: list(PAPER_RECIPE), metadata=rule(is_args, "--key=value strings"))
    nanogrow_recipe: list = field(default_factory=lambda: list(NANOGROW_RECIPE), metadata=rule(is_args, "--key=value strings"))
    # Table 4's one learning rate for every stage; 0: the largest stage's
    fixed_lr: float = field(default=0.0, metadata=at_least(0, "a finite number >= 0 (0: the largest stage's)"))
    # document i of the corpus is held out of pretraining iff i % heldout_every == 0
    heldout_every: int = field(default=10, metadata=at_least(2, "an integer >= 2"))
    # function j of the pretraining documents is held out of post-training iff j % posttrain_heldout_every == 0
    posttrain_heldout_every: int = field(default=5, metadata=at_least(2, "an integer >= 2"))
    # answers per multiple-choice item (1 right, the rest drawn from other held-out documents)
    choices: int = field(default=4, metadata=at_least(2, "an integer >= 2"))
    max_task_items: int = field(default=0, metadata=at_least(0, ">= 0 (0: all)"))  # per task (a short test grid)
    # post-training: one recipe for every member (section 4.1), scaled to the CPU models
    sft_steps: int = field(default=120, metadata=AT_LEAST_1)
    sft_lr: float = field(default=3e-4, metadata=above(0))
    dpo_steps: int = field(default=60, metadata=AT_LEAST_1)
    dpo_lr: float = field(default=1e-4, metadata=above(0))
    dpo_beta: float = field(default=0.1, metadata=above(0))
    post_batch_size: int = field(default=8, metadata=AT_LEAST_1)
    max_len: int = field(default=256, metadata=AT_LEAST_1)  # tokens per conversation (the CPU shapes' context)
    data_seed: int = 1337  # the held-out split's tasks and pairs (the same for every seed)
    jobs: int = field(default=1, metadata=AT_LEAST_1)  # runs at once, each a process with cores / jobs torch threads
    estimate: bool = False  # print the plan and its CPU-time estimate, then stop
    resume: bool = False
    overwrite: bool = False
    overrides: list = field(default_factory=list, metadata=rule(is_args, "--key=value strings"))  # for every series run

    def check(self):
        require(os.path.isfile(self.series), "series", self.series, "a series config file (e.g. configs/series_cpu.py)")


# -----------------------------------------------------------------------------
# statistics over seeds: closed forms in float64, no scipy


def mean_sd(xs):
    """(mean, sample standard deviation) of a list; the sd is nan for one value."""
    n = len(xs)
    mean = math.fsum(xs) / n
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")


def t_central(t, df):
    """P(|T| <= t) for Student's t with integer df > 0, in closed form (Abramowitz and Stegun 26.7.3-4): with
    theta = atan(t / sqrt(df)), odd df: (2/pi)(theta + sin(theta)(cos + 2/3 cos^3 + ... + (2*4..(df-3))/(1*3..(df-2))
    cos^(df-2))), even df: sin(theta)(1 + 1/2 cos^2 + ... + (1*3..(df-3))/(2*4..(df-2)) cos^(df-2))."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:
        total = term = c if df > 1 else 0.0
        for k in range(1, (df - 3) // 2 + 1):
            term *= c * c * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + s * total)
    total = term = 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c * c * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(level, df):
    """t with P(|T| <= t) = level: bisection on theta in [0, pi/2) (t_central is increasing in it), to float64."""
    lo, hi = 0.0, math.pi / 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_central(math.sqrt(df) * math.tan(mid), df) < level:
            lo = mid
        else:
            hi = mid
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def paired(a, b, level=0.95):
    """a - b over the seeds both have ({seed: value} each): {"n", "mean", "sd", "lo", "hi"}, the level t interval of
    the mean difference (lo = hi = nan for one seed)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if not d:
        return {"n": 0, "mean": float("nan"), "sd": float("nan"), "lo": float("nan"), "hi": float("nan")}
    mean, sd = mean_sd(d)
    half = t_quantile(level, len(d) - 1) * sd / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"n": len(d), "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def verdict(diff, bound=0.0, claim="below", measurable=True):
    """The claim is diff < bound ("below") or diff > bound ("above"): held when the whole interval is on that side,
    not held when it is all on the other, inconclusive when it straddles the bound (or one seed gives none); not
    measurable at this scale when every model is within two standard errors of chance."""
    if not measurable:
        return "not measurable at this scale"
    lo, hi = diff["lo"], diff["hi"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    below, above = hi < bound, lo > bound
    if claim == "above":
        below, above = above, below
    return "held" if below else "not held" if above else "inconclusive"


def overall(verdicts):
    """One verdict from several (sizes, tasks): not held if any is, held if all are, not measurable if all are."""
    verdicts = list(verdicts)
    if not verdicts:
        return "inconclusive"
    if "not held" in verdicts:
        return "not held"
    for v in ("held", "not measurable at this scale"):
        if all(x == v for x in verdicts):
            return v
    return "inconclusive"


def near_chance(value, stderr, chance):
    """A model's accuracy within two standard errors of chance."""
    return abs(value - chance) <= 2 * stderr


# -----------------------------------------------------------------------------
# the data: held-out documents become tasks, the pretraining documents' functions the post-training pairs

SIGNATURE = re.compile(r"^([A-Za-z_][\w.]*)\(")  # a documentation that opens with its call signature: `loads(s, ...)`


def split_corpus(docs, every):
    """(kept documents, held-out documents): document i is held out iff i % every == 0."""
    return [d for i, d in enumerate(docs) if i % every], [d for i, d in enumerate(docs) if i % every == 0]


def first_sentence(text, limit=160):
    """The text up to its first sentence end (". ", ".\\n" or a blank line), whitespace folded; None when
    that is shorter than 15 or longer than `limit` characters (not a usable answer)."""
    text = " ".join(text.split("\n\n", 1)[0].split())
    m = re.search(r"\.(\s|$)", text)
    sentence = text[:m.start() + 1] if m else text
    return sentence if 15 <= len(sentence) <= limit else None


def documented_function(doc):
    """(name, signature block, first sentence of its documentation) of a documentation that opens with a call
    signature, else None."""
    head, _, body = doc.partition("\n\n")
    m = SIGNATURE.match(head)
    sentence = first_sentence(body) if m else None
    return (m.group(1), head, sentence) if sentence else None


def continuation_item(doc, min_context=150, ending=(20, 160)):
    """(context, ending) of a held-out document: its lines up to the first at least min_context characters
    long, then its next non-blank line; None for a document too short for that."""
    lines = doc.split("\n")
    for i in range(1, len(lines)):
        context = "\n".join(lines[:i]) + "\n"
        if len(context) >= min_context:
            nxt = next((line.strip() for line in lines[i:] if line.strip()), "")
            return (context, nxt) if ending[0] <= len(nxt) <= ending[1] else None
    return None


def choice_items(pairs, n_choices, seed):
    """Multiple-choice rows {"context", "choices", "gold"}: each pair's own answer among n_choices - 1 answers
    of other pairs (distinct texts), at a position drawn at random; a pure function of (pairs, seed)."""
    rng = random.Random(seed)
    rows = []
    for i, (context, answer) in enumerate(pairs):
        others = sorted({a for j, (_, a) in enumerate(pairs) if j != i and a != answer})
        if len(others) < n_choices - 1:
            continue
        choices = rng.sample(others, n_choices - 1)
        gold = rng.randrange(n_choices)
        choices.insert(gold, answer)
        rows.append({"context": context, "choices": choices, "gold": gold})
    return rows


def corrupt(sentence, rng, swaps=2):
    """A corrupted copy of a sentence: `swaps` random pairs of its words exchanged. The same words, so a model tells
    it from the true sentence only by having learned how such text goes: a preference a model can learn. None when
    every swap gives the sentence back (a sentence of one repeated word)."""
    words = sentence.split()
    if len(set(words)) < 2:
        return None
    out, done = list(words), 0
    while done < swaps or out == words:  # two swaps of a two-word sentence give it back: one more
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
        done += 1
    return " ".join(out)


def chat_pairs(functions, seed):
    """(SFT rows in UltraChat's schema, DPO rows in UltraFeedback's) from (name, _, sentence) triples: the
    question names the function, the SFT answer and DPO's chosen one are its documentation's first sentence, the
    rejected one a corrupted copy of it (corrupt)."""
    rng = random.Random(seed)
    sft, dpo = [], []
    for name, _, sentence in functions:
        ask = {"role": "user", "content": f"What does {name} do?"}
        sft.append({"messages": [ask, {"role": "assistant", "content": sentence}]})
        bad = corrupt(sentence, rng)
        if bad is not None:
            dpo.append({"chosen": [ask, {"role": "assistant", "content": sentence}],
                        "rejected": [ask, {"role": "assistant", "content": bad}]})
    return sft, dpo


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def build_data(cfg):
    """Write OUT/data/: the pretraining corpus, the held-out tasks and the post-training sets. A pure function of
    the installed documentation (data.corpus_versions) and the config."""
    docs = data.default_corpus()
    train_docs, held = split_corpus(docs, cfg.heldout_every)
    seen = [f for f in map(documented_function, train_docs) if f]  # documented in the pretraining corpus
    post_train, post_held = split_corpus(seen, cfg.posttrain_heldout_every)
    limit = cfg.max_task_items or None
    files = {"pretrain": [{"text": d} for d in train_docs],
             "continuation": choice_items([p for p in map(continuation_item, held) if p], cfg.choices, cfg.data_seed)[:limit],
             "doc_name": choice_items([(head + "\n\n", s) for _, head, s in filter(None, map(documented_function, held))],
                                      cfg.choices, cfg.data_seed + 1)[:limit]}
    for split, fns in (("train", post_train), ("heldout", post_held)):
        files[f"sft_{split}"], files[f"dpo_{split}"] = chat_pairs(fns, cfg.data_seed + 2)
    for name, rows in files.items():
        write_jsonl(os.path.join(cfg.out_dir, "data", name + ".jsonl"), rows)
    return {name: len(rows) for name, rows in files.items()}


# -----------------------------------------------------------------------------
# the grid: its parts (series.py runs), the runs each part makes, and what they cost


@dataclass
class Part:
    name: str  # s<seed>/<recipe>[_top_rate | _one_rate]: its folder under out_dir
    seed: int
    recipe: str
    kind: str  # "series" (grown, scratch, fixed data), "top_rate" (scratch at the largest rate), "one_rate" (Table 4)
    cfg: series.SeriesConfig


def recipe_config(cfg, recipe, seed):
    """The SeriesConfig of one recipe and seed: the base config, the recipe's settings, the overrides, then the
    grid's members, corpus and tokens per parameter. Every part resumes (a finished run is kept)."""
    base = configure(series.SeriesConfig, [cfg.series] + list(getattr(cfg, f"{recipe}_recipe")) + list(cfg.overrides))
    return replace(base, stages=[dict(st) for st in cfg.stages], data=[os.path.join(cfg.out_dir, "data", "pretrain.jsonl")],
                   data_names=[], data_weights=[], data_dir=os.path.join(cfg.out_dir, "data_cache"),
                   tokens_per_param=cfg.tokens_per_param, seed=seed, resume=True, overwrite=False, report=True)


def grid_parts(cfg):
    """Every Part of the grid, seed by seed."""
    parts = []
    for seed in cfg.seeds:
        for recipe in RECIPES:
            rc = recipe_config(cfg, recipe, seed)
            top = rc.stages[-1]["lr"]
            at = lambda kind: os.path.join(cfg.out_dir, f"s{seed}", recipe + ("" if kind == "series" else "_" + kind))
            parts.append(Part(f"s{seed}/{recipe}", seed, recipe, "series",
                              replace(rc, series_mode="grow+scratch+fixed_data", out_dir=at("series"))))
            # the paper's comparison: every smaller size from scratch at the largest member's rate
            parts.append(Part(f"s{seed}/{recipe}_top_rate", seed, recipe, "top_rate",
                              replace(rc, series_mode="scratch", out_dir=at("top_rate"),
                                      stages=[dict(st, scratch_lr=top) for st in rc.stages[:-1]])))
            if recipe == "paper":  # Table 4: every stage at one rate
                one = cfg.fixed_lr or top
                parts.append(Part(f"s{seed}/paper_one_rate", seed, recipe, "one_rate",
                                  replace(rc, series_mode="grow", out_dir=at("one_rate"),
                                          stages=[dict(st, lr=one, scratch_lr=one) for st in rc.stages])))
    return parts


def planned_runs(part):
    """[(folder, shape, tokens)] of every training run series.py makes for this part, in its order (series.py's
    train_grown_series and train_scratch_baselines)."""
    c = part.cfg
    stages, _ = series.plan_series(c)
    modes, runs = c.series_mode.split("+"), []

    def grown(mode, chosen):
        for s in chosen:
            if c.grow_schedule == "wsd":
                runs.append((os.path.join(c.out_dir, mode + "_trunk", s.name), s.shape, series.trunk_tokens(c, s)))
                runs.append((os.path.join(c.out_dir, mode, s.name), s.shape, series.cooldown_tokens(c, s)))
            else:
                runs.append((os.path.join(c.out_dir, mode, s.name), s.shape, s.staged_tokens))

    if "grow" in modes:
        grown("grow", stages)
    if "scratch" in modes:
        runs += [(os.path.join(c.out_dir, "scratch", s.name), s.shape, s.scratch_tokens) for s in stages
                 if not (s.index == 0 and "grow" in modes)]
    if "fixed_data" in modes:
        grown("fixed_data", [s for s in stages if s.repeats_in_fixed_data or "grow" not in modes])
    return runs


def calibrate(shapes, batch_size, seq_len, threads, steps=6):
    """Seconds per training token of each shape on this machine now: AdamW steps on random tokens at the grid's
    batch, timed after two warm-up steps, with `threads` torch threads (what each of the grid's processes gets)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    cost = {}
    try:
        for shape in shapes:
            torch.manual_seed(0)
            model = Llama(config_from_shape(shape, max_seq_len=seq_len))
            optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
            x = torch.randint(0, 256, (batch_size, seq_len + 1))
            for i in range(steps + 2):
                if i == 2:
                    t0 = time.perf_counter()
                model(x[:, :-1], x[:, 1:])[1].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            cost[shape] = (time.perf_counter() - t0) / (steps * batch_size * seq_len)
    finally:
        torch.set_num_threads(before)
    return cost


def estimate(cfg, parts, threads):
    """{"train", "posttrain", "tasks", "total"} seconds of one-process CPU time for what is left of the grid (runs
    with a final.pt are done), from calibrate's cost per token: a training token costs one step's share, a
    validation token a third of it (forward only), a post-training example max_len / 2 tokens, SFT one pass, DPO
    three (chosen and rejected, and the reference's log-probabilities); a task item `choices` forward passes."""
    base = parts[0].cfg
    runs = [(p, r) for p in parts for r in planned_runs(p)]
    shapes = sorted({shape for _, (_, shape, _) in runs}, key=lambda s: config_from_shape(s).d_model * config_from_shape(s).n_layers)
    cost = calibrate(shapes, base.batch_size, base.seq_len, threads)
    tokens_per_step = base.batch_size * base.seq_len * base.grad_accum
    train = 0.0
    for p, (folder, shape, tokens) in runs:
        if not os.path.exists(os.path.join(folder, "final.pt")):
            steps = math.ceil(tokens / tokens_per_step)
            val = (steps // p.cfg.eval_interval + 2) * p.cfg.eval_batches * p.cfg.batch_size * p.cfg.seq_len
            train += cost[shape] * (steps * tokens_per_step + val / 3)
    members = post_members(cfg, parts)
    post = sum(cost[shape] * cfg.post_batch_size * cfg.max_len / 2 * (cfg.sft_steps + 3 * cfg.dpo_steps)
               for key, shape in members.items() if not os.path.exists(os.path.join(post_dir(cfg, key), "dpo", "final.pt")))
    items = cfg.max_task_items * 2 or 400  # about 300 continuation and 100 doc_name items
    tasks = sum(cost[shape] * items * cfg.choices * cfg.max_len / 2 / 3 for key, shape in task_members(cfg, parts).items()
                if not os.path.exists(task_path(cfg, key)))
    return {"train": train, "posttrain": post, "tasks": tasks, "total": train + post + tasks,
            "runs": len(runs), "tokens": sum(t for _, (_, _, t) in runs)}


def post_members(cfg, parts):
    """{member key: shape} post-trained: every grown, scratch (both comparisons) and fixed-data member but the smallest."""
    out = {}
    for p in parts:
        stages, _ = series.plan_series(p.cfg)
        for s in stages[1:] if p.kind != "one_rate" else []:
            modes = p.cfg.series_mode.split("+")
            for mode in modes:
                if mode != "fixed_data" or s.repeats_in_fixed_data:
                    out[member_key(p, mode, s.name)] = s.shape
    return out


def task_members(cfg, parts):
    """{member key: shape} scored on the held-out tasks: every finished member of the grid."""
    out = {}
    for p in parts:
        stages, _ = series.plan_series(p.cfg)
        for s in stages:
            for mode in p.cfg.series_mode.split("+"):
                if (mode != "fixed_data" or s.repeats_in_fixed_data) and not (mode == "scratch" and s.index == 0 and "grow" in p.cfg.series_mode):
                    out[member_key(p, mode, s.name)] = s.shape
    return out


def member_key(part, mode, stage):
    """A finished member's name in the grid: its part, mode and stage (its final.pt is OUT/<key>/final.pt)."""
    return f"{part.name}/{mode}/{stage}"


# -----------------------------------------------------------------------------
# running: the series parts, then post-training and tasks of their members, `jobs` processes at once


def pool_map(cfg, fn, items, threads):
    """fn over items, in this process (jobs=1) or in cfg.jobs processes, each with `threads` torch threads."""
    if cfg.jobs == 1 or len(items) < 2:
        return [fn(x) for x in items]
    with multiprocessing.get_context("spawn").Pool(cfg.jobs, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        out = pool.map(fn, items, chunksize=1)
        pool.close()  # the workers exit on their own (terminate, the with-block's exit, leaves semaphores behind)
        pool.join()
    return out


def run_part(part):
    t = time.time()
    series.run_series(part.cfg)
    return part.name, time.time() - t


def posttrain_member(job):
    """SFT then DPO of one member, the same recipe for every member; returns (key, {"sft_loss", "dpo_loss",
    "dpo_accuracy", "dpo_margin"} on the held-out pairs)."""
    cfg, key, seed = job
    out = post_dir(cfg, key)
    data_dir = os.path.join(cfg.out_dir, "data")
    shared = dict(max_len=cfg.max_len, max_prompt_len=cfg.max_len // 2, batch_size=cfg.post_batch_size, grad_accum=1,
                  eval_examples=0, device="cpu", seed=seed, log_interval=20, resume=True, plot=False, warmup_frac=0.1)
    sft = posttrain.PostTrainConfig(out=os.path.join(out, "sft"), data=os.path.join(data_dir, "sft_train.jsonl"),
                                    eval_data=os.path.join(data_dir, "sft_heldout.jsonl"), max_steps=cfg.sft_steps, lr=cfg.sft_lr,
                                    **shared)
    dpo = posttrain.PostTrainConfig(out=os.path.join(out, "dpo"), data=os.path.join(data_dir, "dpo_train.jsonl"),
                                    eval_data=os.path.join(data_dir, "dpo_heldout.jsonl"), max_steps=cfg.dpo_steps, lr=cfg.dpo_lr,
                                    max_examples=cfg.dpo_steps * cfg.post_batch_size,  # no reference log-probs for pairs never used
                                    loss="dpo", beta=cfg.dpo_beta, **shared)
    for cmd, pcfg, start in (("sft", sft, os.path.join(cfg.out_dir, key, "final.pt")), ("dpo", dpo, os.path.join(sft.out, "final.pt"))):
        if not os.path.exists(os.path.join(pcfg.out, "final.pt")):
            print(f"=== posttrain {cmd}: {key} ===")
            posttrain.train(cmd, start, pcfg)
    sft_val, dpo_val = last_validation(sft.out), last_validation(dpo.out)
    return key, {"sft_loss": sft_val["val_loss"], "dpo_loss": dpo_val["val_loss"], "dpo_accuracy": dpo_val["val_rewards/accuracy"],
                 "dpo_margin": dpo_val["val_rewards/margins"]}


def post_dir(cfg, key):
    return os.path.join(cfg.out_dir, "posttrain", key.replace("/", "_"))


def last_validation(run_dir):
    """The last validation record of a run's metrics.jsonl."""
    return [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "val_loss" in r][-1]


def task_path(cfg, key):
    return os.path.join(cfg.out_dir, "tasks", key.replace("/", "_") + ".json")


def task_scores(job):
    """(key, {task: {"acc", "acc_norm"}}) of one finished member on the held-out tasks ({"value", "stderr", "n"}
    each), through eval.py's scoring of multiple-choice tasks (the harness's loglikelihood path); kept in OUT/tasks/
    so a resumed grid does not score it again."""
    cfg, key = job
    path = task_path(cfg, key)
    if os.path.exists(path):
        with open(path) as f:
            return key, json.load(f)
    model, tok = evaluation.load_model(os.path.join(cfg.out_dir, key, "final.pt"))
    scores = {}
    for name in ("continuation", "doc_name"):
        rows = evaluation.read_rows(os.path.join(cfg.out_dir, "data", name + ".jsonl"))
        # the choices follow a newline or a blank line in the context: no " " delimiter in front of them
        task = evaluation.Task("", "", "", "choice", choice_doc, True)
        scores[name] = evaluation.eval_choice(model, tok, rows, task, progress=False)[0]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(scores, f)
    os.replace(path + ".tmp", path)
    return key, scores


def choice_doc(row):
    """One held-out task row as eval.py's choice tasks read a document: (contexts, continuations, gold, lengths for acc_norm)."""
    return [row["context"]] * len(row["choices"]), row["choices"], row["gold"], [len(c) for c in row["choices"]]


def prepare_pretraining(part):
    """The pretraining corpus tokenized into the parts' data_dir once, before the processes that read it start
    (train.prepare_data's folder and arguments: each run then finds it prepared)."""
    c = part.cfg
    for src in c.data:
        out = os.path.join(c.data_dir, os.path.basename(data.default_out_dir(src, c.tokenizer)))
        data.prepare(src, tokenizer=c.tokenizer, out_dir=out, max_tokens=c.max_data_tokens or None, text_field=c.text_field)


def run_grid(cfg):
    """Every part for cfg.seeds, then post-training and tasks of their members; each keeps what is finished under
    --resume. Returns the results record (results.json)."""
    t0 = time.time()
    threads = max(1, torch.get_num_threads() // cfg.jobs)  # torch's own count: the cores, or OMP_NUM_THREADS
    parts = grid_parts(cfg)
    cost = estimate(cfg, parts, threads)
    print(f"grid: {len(cfg.seeds)} seeds x {len(parts) // len(cfg.seeds)} parts, {cost['runs']} training runs, "
          f"{cost['tokens'] / 1e6:.0f}M training tokens | estimated CPU time left: {fmt_time(cost['total'])} "
          f"(training {fmt_time(cost['train'])}, post-training {fmt_time(cost['posttrain'])}, tasks {fmt_time(cost['tasks'])}; "
          f"{threads} torch thread(s) per process), about {fmt_time(cost['total'] / cfg.jobs)} wall with jobs={cfg.jobs}", flush=True)
    if cfg.estimate:
        return None
    results = {"config": asdict(cfg), "data": build_data(cfg), "estimate": cost, "times": {}}
    print(f"data: {results['data']}")
    prepare_pretraining(parts[0])
    # longest first, so that the processes finish together
    order = sorted(parts, key=lambda p: -sum(t for _, _, t in planned_runs(p)))
    for name, seconds in pool_map(cfg, run_part, order, threads):
        results["times"][name] = seconds
    t = time.time()
    seed_of = {p.name: p.seed for p in parts}
    post_jobs = [(cfg, key, seed_of[key.rsplit("/", 2)[0]]) for key in post_members(cfg, parts)]
    results["posttrain"] = dict(pool_map(cfg, posttrain_member, post_jobs, threads))
    results["times"]["posttrain"] = time.time() - t
    t = time.time()
    results["tasks"] = dict(pool_map(cfg, task_scores, [(cfg, key) for key in task_members(cfg, parts)], threads))
    results["times"]["tasks"] = time.time() - t
    results["arms"] = collect(cfg, parts)
    results["times"]["total"] = time.time() - t0
    results["run_seconds"] = run_seconds(cfg.out_dir)
    return results


def run_seconds(out_dir):
    """The wall time of every training and post-training run of the grid, summed: from its lock (written when
    the run starts, or resumes) to its final.pt. What the grid costs in one process, however it was split."""
    total = 0.0
    for root, _, files in os.walk(out_dir):
        if "final.pt" in files and "run.lock" in files:
            total += os.path.getmtime(os.path.join(root, "final.pt")) - os.path.getmtime(os.path.join(root, "run.lock"))
    return total


# -----------------------------------------------------------------------------
# the results: every finished member by seed, recipe, arm and size


def passes(metrics_path):
    """Passes over its (capped) corpus a run's data stream had made when it ended: the last "epochs" it logged."""
    rows = [r for r in read_jsonl(metrics_path) if "epochs" in r]
    return sum(rows[-1]["epochs"].values()) if rows else None


def member(cfg, part, run):
    """A finished member as the report reads it."""
    key = member_key(part, run["mode"], run["stage"])
    return {"key": key, "stage": run["stage"], "index": run["index"], "params": run["params"], "val_loss": run["val_loss"],
            "flops": run["flops"], "series_flops": run.get("series_flops") or run["flops"], "tokens": run["tokens"],
            "lr": run["lr"], "finished": run.get("finished", True), "schedule": run.get("schedule", ""),
            "unique_token_cap": run.get("unique_token_cap"), "metrics": os.path.join(part.name, run["metrics"]),
            "passes": passes(os.path.join(part.cfg.out_dir, run["metrics"]))}


def collect(cfg, parts):
    """{seed: {recipe: {arm: {index: member}}}}, arms: "grow", "scratch" (each size at its own rate, the equal-rate
    comparison; index 0 is the grown chain's start), "scratch_top" (the paper's: every size at the largest member's
    rate; the largest is scratch's), "fixed_data" (the stages that read tokens again), "one_rate" (Table 4)."""
    out = {}
    for p in parts:
        runs = report.load_series(p.cfg.out_dir)["runs"]
        arms = out.setdefault(str(p.seed), {}).setdefault(p.recipe, {})
        at = lambda chosen: {r["index"]: member(cfg, p, r) for r in chosen}
        if p.kind == "series":
            chains = report.series_chains(runs)
            arms["grow"], arms["scratch"] = at(chains["grow"]), at(chains["scratch"])
            arms["fixed_data"] = at([r for r in runs if r["mode"] == "fixed_data"])
        elif p.kind == "top_rate":
            arms["scratch_top"] = at(runs)
        else:
            arms["one_rate"] = at(runs)
    for recipes in out.values():
        for arms in recipes.values():
            largest = max(arms["scratch"])
            arms.setdefault("scratch_top", {})[largest] = arms["scratch"][largest]
    return out


# -----------------------------------------------------------------------------
# the report: each claim of the paper, per recipe and comparison, over the seeds

COMPARISONS = {"scratch_top": "the paper's comparison: scratch at the largest member's rate",
               "scratch": "equal rates: scratch at each size's own rate"}
ARM_NAMES = {"grow": "grown", "scratch": "scratch, own rate", "scratch_top": "scratch, largest rate",
             "fixed_data": "grown, fixed data", "one_rate": "grown, one rate"}


def at(arm, index):
    """An arm's member at a stage index (results.json, read back, has the indices as strings)."""
    return arm.get(index, arm.get(str(index)))


def members_at(results, recipe, arm, index):
    """{seed: member} of one cell, over the seeds that have it."""
    out = {}
    for seed, recipes in results["arms"].items():
        m = at(recipes.get(recipe, {}).get(arm, {}), index)
        if m is not None:
            out[int(seed)] = m
    return out


def values(results, recipe, arm, index, field_name="val_loss", scores=None):
    """{seed: value} of one cell; scores: (a {member key: entry} table, a function of the entry) in place of a field."""
    if scores is None:
        return {s: m[field_name] for s, m in members_at(results, recipe, arm, index).items()}
    table, get = scores
    return {s: get(table[m["key"]]) for s, m in members_at(results, recipe, arm, index).items() if m["key"] in table}


def cell(xs, digits=4, scale=1.0):
    """mean ± sd of {seed: value} (one seed: its value)."""
    if not xs:
        return "-"
    mean, sd = mean_sd([scale * x for x in xs.values()])
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if len(xs) > 1 else " (1 seed)")


def diff_cell(d, base=None, digits=4, scale=1.0):
    """mean difference, its 95% interval, and relative to base's mean."""
    if not d["n"]:
        return "-"
    rel = f" ({100 * d['mean'] / base:+.1f}%)" if base else ""
    ci = f" [{scale * d['lo']:+.{digits}f}, {scale * d['hi']:+.{digits}f}]" if math.isfinite(d["lo"]) else ""
    return f"{scale * d['mean']:+.{digits}f}{ci}{rel}"


def bold(v):
    return f"**{v}**"


def indices(results, recipe, arm):
    return sorted({int(i) for recipes in results["arms"].values() for i in recipes.get(recipe, {}).get(arm, {})})


def stage_name(results, recipe, index):
    for arm in ("grow", "scratch", "scratch_top", "fixed_data", "one_rate"):
        for m in members_at(results, recipe, arm, index).values():
            return m["stage"]
    return str(index)


def loss_claim(results, recipe, arm_a, arm_b, sizes, bound=lambda b: 0.0, claim="below"):
    """Rows [size, a, b, a - b with its interval, verdict] and the verdicts, for validation loss at each size."""
    rows, verdicts = [], []
    for i in sizes:
        a, b = values(results, recipe, arm_a, i), values(results, recipe, arm_b, i)
        d = paired(a, b)
        base = mean_sd(list(b.values()))[0] if b else None
        v = verdict(d, bound(base) if base else 0.0, claim) if d["n"] else "-"
        rows.append([stage_name(results, recipe, i), cell(a), cell(b), diff_cell(d, base), v])
        if v != "-":
            verdicts.append(v)
    return rows, verdicts


def score_claim(results, recipe, arm_a, arm_b, sizes, table, get, stderr, chance, claim, digits=4, scale=1.0):
    """As loss_claim for a post-training or task score; not measurable where every model of both arms at that size
    is within two standard errors of chance (stderr(entry) gives a model's)."""
    rows, verdicts = [], []
    for i in sizes:
        a, b = values(results, recipe, arm_a, i, scores=(table, get)), values(results, recipe, arm_b, i, scores=(table, get))
        d = paired(a, b)
        if not d["n"]:
            continue
        models = [table[m["key"]] for arm in (arm_a, arm_b) for m in members_at(results, recipe, arm, i).values() if m["key"] in table]
        measurable = chance is None or not all(near_chance(get(e), stderr(e), chance) for e in models)
        v = verdict(d, 0.0, claim, measurable)
        rows.append([stage_name(results, recipe, i), cell(a, digits, scale), cell(b, digits, scale), diff_cell(d, None, digits, scale), v])
        verdicts.append(v)
    return rows, verdicts


def table(header, rows):
    return report.markdown_table(header, rows).split("\n")


def recipe_section(cfg, results):
    """Where each setting of the two recipes comes from."""
    keys = ["grow_width", "grow_depth", "grow_schedule", "decay_frac", "grow_noise", "grow_optimizer", "grow_warmup_steps"]
    parsed = {r: dict(a[2:].split("=", 1) for a in results["config"][f"{r}_recipe"]) for r in RECIPES}
    rows = []
    for k in keys:
        if any(k in parsed[r] for r in RECIPES):
            source = PAPER_STATES.get(k, "nanogrow's choice (the paper states none)")
            if k == "grow_schedule":
                source = ("the paper's: every member a finished model; its schedule per stage is not stated, the cosine "
                          "per stage is nanogrow's reading; wsd is MiniCPM's (Hu et al. 2024, section 4)")
            rows.append([k, parsed["paper"].get(k, "-"), parsed["nanogrow"].get(k, "-"), source])
    rows.append(["learning rates", "per stage, falling with size", "the same", "section 3.5 (the values are nanogrow's, for these sizes)"])
    rows.append(["tokens per parameter", f"{cfg.tokens_per_param:g}", "the same", tpp_source(cfg)])
    return ["## The recipes", "", "Each setting and where it comes from; what the paper leaves open is nanogrow's choice.", ""] + \
        table(["setting", "paper's recipe", "nanogrow's recipe", "source"], rows) + [""]


def tpp_source(cfg):
    return "2x Chinchilla, the paper's, section 3.3" if cfg.tokens_per_param == 40 else "the paper's is 40, 2x Chinchilla, section 3.3"


def write_report(cfg, results, out_dir):
    """reproduction.md and its two figures in out_dir."""
    seeds = sorted(int(s) for s in results["arms"])
    recipe_label = {"paper": "the paper's recipe", "nanogrow": "nanogrow's recipe"}
    lines = ["# The paper's claims at CPU scale, over seeds", "",
             "Yano, Takase, Kobayashi, Kiyono and Suzuki 2025 (*Efficient construction of a model series by staged "
             "pretraining with model expansion*) against nanogrow on 2 CPU cores. Every number below comes from", "",
             f"    python experiments/reproduce.py configs/reproduce_cpu.py{' --docs_dir=' + cfg.docs_dir if cfg.docs_dir else ''}", "",
             f"with seeds {', '.join(map(str, seeds))} (each changes initialization, data order and growth noise). Its "
             f"training and post-training runs took {fmt_time(results.get('run_seconds', 0))} of wall time in all (each run "
             "from start to final.pt, summed; BENCHMARKS.md says how it was run). Losses are validation cross-entropy in "
             "nats per byte on held-out documents of the pretraining corpus. Sizes are non-embedding parameters; FLOPs "
             "are 6XT, cumulative over the stages that led to a model (with nanogrow's recipe, plus the cooldown branches "
             f"of the earlier members). Members train at {cfg.tokens_per_param:g} tokens per parameter ({tpp_source(cfg)}), "
             "every member a finished model.", "",
             f"Every cell is the mean ± sd over the seeds; a difference is paired by seed, with its 95% t interval in "
             "brackets. A verdict is **held** when the interval lies on the claim's side of its bound, **not held** when it "
             "lies on the other, **inconclusive** when it straddles the bound, **not measurable at this scale** when every "
             "model is within two standard errors of chance.", ""]
    lines += recipe_section(cfg, results)
    summary = []

    # claim 0: Table 1
    lines += ["## 0. Table 1, Figure 2: the series for the price of its largest member, each member as good", "",
              "Paper (8B scale, PPL): scratch / grown 10.4 / 10.1 (2B), 9.18 / 8.72 (4B), 7.85 / 7.64 (8B); about 25% "
              "of the FLOPs saved. The claim: grown − scratch below 0 at every size.", ""]
    for recipe in RECIPES:
        grown = indices(results, recipe, "grow")
        for arm, what in COMPARISONS.items():
            rows, verdicts = loss_claim(results, recipe, "grow", arm, grown[1:])
            v = overall(verdicts)
            summary.append((f"Table 1: grown members at or below scratch ({recipe_label[recipe]}, {what.split(':')[0]})", v))
            lines += [f"**{recipe_label[recipe].capitalize()}, {what}:** {bold(v)}.", ""]
            lines += table(["size", "grown", ARM_NAMES[arm], "grown − scratch [95% CI]", "verdict"], rows) + [""]
        top = max(grown)
        cost = values(results, recipe, "grow", top, "series_flops")  # with every cooldown branch under wsd
        each = [values(results, recipe, "scratch", i, "flops") for i in grown]  # index 0: the grown chain's start
        scratch_total = {s: sum(e[s] for e in each) for s in cost if all(s in e for e in each)}
        saved = {s: 1 - cost[s] / scratch_total[s] for s in scratch_total}
        lines += [f"Series cost, {recipe_label[recipe]}: {mean_sd(list(cost.values()))[0]:.3g} FLOPs (the grown series, "
                  f"every cooldown included) against {mean_sd(list(scratch_total.values()))[0]:.3g} for every size from "
                  f"scratch: {cell(saved, 1, 100)}% saved (paper: about 25%).", ""]
    lines += ["![final validation loss of every member, mean and spread over the seeds](reproduction_series.png)", "",
              "![grown − scratch with its 95% interval](reproduction_diff.png)", ""]

    # claim 1: Table 4
    lines += ["## 1. Table 4 / Appendix C: one learning rate for every stage is worse", "",
              "The paper's recipe again, every stage at the largest member's rate (the paper fixes every stage at its 8B "
              "rate 3e-4). Paper (PPL): per-stage 7.64 against one rate 8.04 at 8B (scratch 7.85). The claim: one rate − "
              "per-stage above 0.", ""]
    sizes = indices(results, "paper", "one_rate")
    rows, verdicts = loss_claim(results, "paper", "one_rate", "grow", sizes, claim="above")
    lines += table(["size", "grown, one rate", "grown, per-stage rates", "one rate − per-stage [95% CI]", "verdict"], rows) + [""]
    v = verdicts[-1] if verdicts else "inconclusive"
    summary.append(("Table 4: one rate for every stage is worse (largest member)", v))
    lines += [f"At the largest member: {bold(v)}; at every size: {bold(overall(verdicts))}.", ""]

    # claim 2: fixed data
    lines += ["## 2. Section 3.3: fixed data gives nearly the same result", "",
              "The grown series with its unique tokens capped at the largest scratch run's; the cap binds at the last "
              "stage alone, which reads tokens again, while the fresh arm reads each token at most once. Paper: 7.64 "
              "both (scratch 7.85). The claim: fixed − fresh below 1% of the fresh loss.", ""]
    for recipe in RECIPES:
        sizes = indices(results, recipe, "fixed_data")
        rows, verdicts = loss_claim(results, recipe, "fixed_data", "grow", sizes, bound=lambda b: 0.01 * b)
        v = overall(verdicts)
        summary.append((f"Section 3.3: fixed data within 1% of fresh ({recipe_label[recipe]})", v))
        lines += [f"**{recipe_label[recipe].capitalize()}:** {bold(v)}.", ""]
        lines += table(["size", "grown, fixed data", "grown, fresh data", "fixed − fresh [95% CI]", "verdict"], rows) + [""]
    lines += passes_section(results)

    # claim 3: Table 2
    post = results.get("posttrain", {})
    n_pairs = results["data"].get("dpo_heldout", 0)
    lines += ["## 3. Table 2: the grown members keep their lead after SFT then DPO", "",
              f"SFT ({cfg.sft_steps} steps, lr {cfg.sft_lr:g}) then DPO ({cfg.dpo_steps} steps, lr {cfg.dpo_lr:g}, beta "
              f"{cfg.dpo_beta:g}), one recipe for every member, batch {cfg.post_batch_size}, on questions about the "
              "functions of the pretraining documents; scored on held-out questions of the same distribution "
              f"({results['data'].get('sft_heldout', 0)} SFT, {n_pairs} DPO pairs whose rejected side is the true sentence with "
              "words swapped): held-out SFT loss (lower is better; the claim: grown − scratch below 0) and DPO reward "
              "accuracy (chance 50%; the claim: grown − scratch above 0). Paper (MT-Bench): grown above scratch at every "
              "size (3.22 / 2.04, 3.63 / 3.02, 3.96 / 3.45).", ""]
    binomial = lambda e: math.sqrt(max(e["dpo_accuracy"] * (1 - e["dpo_accuracy"]), 1e-12) / max(n_pairs, 1))
    for recipe in RECIPES:
        sizes = indices(results, recipe, "grow")[1:]
        for arm, what in COMPARISONS.items():
            sft_rows, sft_v = score_claim(results, recipe, "grow", arm, sizes, post, lambda e: e["sft_loss"], None, None, "below")
            dpo_rows, dpo_v = score_claim(results, recipe, "grow", arm, sizes, post, lambda e: e["dpo_accuracy"], binomial, 0.5,
                                          "above", 1, 100)
            summary.append((f"Table 2: SFT loss ({recipe_label[recipe]}, {what.split(':')[0]})", overall(sft_v)))
            summary.append((f"Table 2: DPO reward accuracy ({recipe_label[recipe]}, {what.split(':')[0]})", overall(dpo_v)))
            lines += [f"**{recipe_label[recipe].capitalize()}, {what}:** SFT loss {bold(overall(sft_v))}, DPO reward accuracy "
                      f"{bold(overall(dpo_v))}.", ""]
            rows = [["SFT loss"] + r for r in sft_rows] + [["DPO accuracy (%)"] + r for r in dpo_rows]
            lines += table(["measure", "size", "grown", ARM_NAMES[arm], "grown − scratch [95% CI]", "verdict"], rows) + [""]

    # claim 4: downstream
    tasks = results.get("tasks", {})
    chance = 1 / cfg.choices
    lines += ["## 4. Table 1's downstream columns: grown members are at least as accurate", "",
              "Two held-out zero-shot multiple-choice tasks built from documents no model saw, scored by eval.py's "
              f"log-likelihood path (acc_norm, %): *continuation* (which of {cfg.choices} next lines continues this "
              f"document?, {results['data'].get('continuation', 0)} items) and *doc_name* (which first sentence documents "
              f"this signature?, {results['data'].get('doc_name', 0)} items). Chance is {100 * chance:.0f}%. The claim: "
              "grown − scratch above 0.", ""]
    for recipe in RECIPES:
        sizes = indices(results, recipe, "grow")[1:]
        for arm, what in COMPARISONS.items():
            rows, verdicts = [], []
            for task in ("continuation", "doc_name"):
                r, v = score_claim(results, recipe, "grow", arm, sizes, tasks, lambda e, t=task: e[t]["acc_norm"]["value"],
                                   lambda e, t=task: e[t]["acc_norm"]["stderr"], chance, "above", 1, 100)
                rows += [[task] + x for x in r]
                verdicts += v
            summary.append((f"Downstream accuracy ({recipe_label[recipe]}, {what.split(':')[0]})", overall(verdicts)))
            lines += [f"**{recipe_label[recipe].capitalize()}, {what}:** {bold(overall(verdicts))}.", ""]
            lines += table(["task", "size", "grown", ARM_NAMES[arm], "grown − scratch [95% CI]", "verdict"], rows) + [""]

    # the loss law
    lines += ["## 5. Predicting the largest member from the smaller ones (the loss law)", "",
              "A law fitted on the mean losses of every member but the largest predicts the largest's: L = E + A N^-alpha "
              "(report.fit_loss_law, E >= 0) and the pure power law A N^-alpha (least squares in log space).", "",
              "| recipe | chain | E + A N^-alpha | A N^-alpha | actual (mean) |", "|---|---|---|---|---|"]
    for recipe in RECIPES:
        for arm in ("scratch", "grow"):
            chain = [{"params": mean_params(results, recipe, arm, i), "val_loss": mean_sd(list(values(results, recipe, arm, i).values()))[0]}
                     for i in indices(results, recipe, arm)]
            if len(chain) < 3:
                lines.append(f"| {recipe} | {ARM_NAMES[arm]} | {len(chain)} members: too few to fit 2 and predict 1 | | |")
                continue
            (p3, e3), (p2, e2) = loss_law_prediction(chain, len(chain) > 3), loss_law_prediction(chain, False)
            lines.append(f"| {recipe} | {ARM_NAMES[arm]} | {p3:.4f} ({100 * e3:+.1f}%) | {p2:.4f} ({100 * e2:+.1f}%) | {chain[-1]['val_loss']:.4f} |")
    lines += [""]

    lines[lines.index("## The recipes"):lines.index("## The recipes")] = ["## Every verdict", ""] + table(
        ["claim", "verdict"], [[c, bold(v)] for c, v in summary]) + [""]
    with open(os.path.join(out_dir, "reproduction.md"), "w") as fh:
        fh.write("\n".join(lines))
    plot_grid(results, out_dir)


def mean_params(results, recipe, arm, index):
    return next(iter(values(results, recipe, arm, index, "params").values()))


def passes_section(results):
    """Every arm's passes over its unique tokens (the corpus, or the fixed-data cap), mean over seeds."""
    rows = []
    for recipe in RECIPES:
        for arm in ("grow", "scratch", "scratch_top", "fixed_data", "one_rate"):
            for i in indices(results, recipe, arm):
                p = {s: v for s, v in values(results, recipe, arm, i, "passes").items() if v is not None}
                cap = next(iter(values(results, recipe, arm, i, "unique_token_cap").values()), None)
                if p:
                    rows.append([recipe, ARM_NAMES[arm], stage_name(results, recipe, i), f"{mean_sd(list(p.values()))[0]:.2f}",
                                 f"the cap, {cap:,} tokens" if cap else "the corpus's pretraining split"])
    return ["Passes each arm's data stream made over its unique tokens, up to each finished member (the lineage's "
            "tokens, with every earlier stage's):", ""] + table(["recipe", "arm", "size", "passes", "over"], rows) + [""]


def loss_law_prediction(chain, free_E=True):
    """(prediction, relative error) of the largest member's validation loss from a law fitted on the others:
    L = E + A N^-alpha (report.fit_loss_law; E >= 0) or, free_E=False, the pure power law A N^-alpha."""
    fit, last = chain[:-1], chain[-1]
    N, L = [r["params"] for r in fit], [r["val_loss"] for r in fit]
    if free_E:
        pred = float(report.loss_law(last["params"], *report.fit_loss_law(N, L)))
    else:
        slope, intercept = np.polyfit(np.log(N), np.log(L), 1)
        pred = float(np.exp(intercept + slope * np.log(last["params"])))
    return pred, pred / last["val_loss"] - 1


def plot_grid(results, out_dir):
    """reproduction_series.png: every arm's final loss against size, mean and sd over the seeds, a panel per recipe;
    reproduction_diff.png: grown − scratch (%) with its 95% interval, per recipe and comparison."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    colors = {"grow": "tab:red", "scratch": "tab:blue", "scratch_top": "tab:cyan", "fixed_data": "tab:orange", "one_rate": "tab:gray"}
    for ax, recipe in zip(axes, RECIPES):
        for arm, color in colors.items():
            points = [(mean_params(results, recipe, arm, i), *mean_sd(list(values(results, recipe, arm, i).values())))
                      for i in indices(results, recipe, arm)]
            if points:
                x, y, sd = zip(*points)
                ax.errorbar(x, y, yerr=[0 if math.isnan(s) else s for s in sd], color=color, marker="o", ms=4, capsize=3,
                            label=ARM_NAMES[arm])
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters")
        ax.set_title(f"{recipe}'s recipe")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("final validation loss (nats per byte)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "reproduction_series.png"), dpi=120)

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for k, (recipe, arm) in enumerate((r, a) for r in RECIPES for a in COMPARISONS):
        pts = []
        for i in indices(results, recipe, "grow")[1:]:
            b = values(results, recipe, arm, i)
            d = paired(values(results, recipe, "grow", i), b)
            if d["n"]:
                base = mean_sd(list(b.values()))[0]
                half = (d["hi"] - d["mean"]) if math.isfinite(d["hi"]) else 0.0
                pts.append((mean_params(results, recipe, "grow", i) * (1 + 0.04 * (k - 1.5)), 100 * d["mean"] / base, 100 * half / base))
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=3, label=f"{recipe}'s recipe, {COMPARISONS[arm].split(':')[0]}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("grown − scratch validation loss (%), 95% interval")
    ax.set_title("Below zero the grown member wins")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "reproduction_diff.png"), dpi=120)


# -----------------------------------------------------------------------------


def main(argv):
    with cli_errors():
        cfg = configure(ReproduceConfig, argv)  # every field's range is declared beside it (common.check_config)
        if cfg.estimate:
            run_grid(cfg)
            return
        lock = claim_grid(cfg.out_dir, cfg.resume, cfg.overwrite)
        try:
            results = run_grid(cfg)
            with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
            for out in [cfg.out_dir] + ([cfg.docs_dir] if cfg.docs_dir else []):
                os.makedirs(out, exist_ok=True)
                write_report(cfg, results, out)
            print(f"report: {os.path.join(cfg.docs_dir or cfg.out_dir, 'reproduction.md')} ({fmt_time(results['times']['total'])})")
        finally:
            lock.release()


if __name__ == "__main__":
    main(sys.argv[1:])
