"""
reproduce.py: every experiment of Yano et al. 2025 at CPU scale, one command, and the report that sets
nanogrow's numbers beside the paper's.

    python experiments/reproduce.py configs/reproduce_cpu.py                  # the grid (about an hour on 2 cores)
    python experiments/reproduce.py configs/reproduce_cpu.py --resume         # after a kill: the cut run resumed
    python experiments/reproduce.py configs/reproduce_cpu.py --docs_dir=docs  # also docs/reproduction.md, figures

The grid, each part a series.py run (or a post-training / evaluation pass) in OUT/<part>:

    main        the paper's experiment 1: grown series (per-stage learning rates, section 3.5), every size from
                scratch, and the grown series with unique data capped at the largest scratch run's (section 3.3)
    fixed_lr    Appendix C / Table 4: the grown series with one learning rate for every stage (the largest's)
    tpp*        the tokens-per-parameter study: grown and scratch at more tokens per parameter, fewer members
    posttrain   Table 2: SFT then DPO of every grown, scratch and fixed-data member of `main`, one recipe for all
    tasks       Table 1's downstream columns: held-out multiple-choice tasks scored as eval.py scores the harness's

Nothing is downloaded. The data all comes from the embedded corpus (data.default_corpus, Python's own
documentation): every heldout_every-th document is held out of pretraining and becomes the tasks and the
evaluation half of the post-training data, so no model has seen any of it:
  - "continuation" (HellaSwag-like): a held-out document's opening lines; which of 4 next lines is its own?
  - "doc_name": a held-out function's signature (`loads(s, *, cls=None, ...)`); which of 4 first sentences of
    documentation belongs to it?
  - SFT: "What does NAME do?" answered with NAME's documentation; DPO: the same prompt, chosen = its own
    documentation, rejected = another function's. Training pairs come from the pretraining documents,
    evaluation pairs from the held-out ones. Scored by held-out SFT loss and DPO reward accuracy / margin
    (the paper's MT-Bench needs a judge model: judge.py, given a URL, is the way to that, not run here).
"""

import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one folder up
import data
import eval as evaluation
import posttrain
import report
import series
from checkpoint import claim_grid
from common import above, at_least, cli_errors, configure, fmt_time, read_jsonl, require, rule

AT_LEAST_1 = at_least(1, "an integer >= 1")


def is_study(pairs):
    """tpp_study's valid value: [tokens per parameter > 0, members >= 2] pairs."""
    return all(isinstance(p, (list, tuple)) and len(p) == 2 and p[0] > 0 and isinstance(p[1], int) and p[1] >= 2 for p in pairs)


@dataclass
class ReproduceConfig:
    out_dir: str = "out/reproduce"
    docs_dir: str = ""  # also write reproduction.md and its figures here ("docs" for the committed copy)
    series: str = "configs/series_cpu.py"  # the base series: shapes, per-stage learning rates, batch, schedule
    # the main series' (the base config's value is replaced by this)
    tokens_per_param: float = field(default=5.0, metadata=above(0))
    # Table 4's one learning rate for every stage; 0: the largest stage's
    fixed_lr: float = field(default=0.0, metadata=at_least(0, "a finite number >= 0 (0: the largest stage's)"))
    # [tokens per parameter, members], smallest first
    tpp_study: list = field(default_factory=lambda: [[20, 2], [40, 2]],
                            metadata=rule(is_study, "a list of [tokens per parameter > 0, members >= 2] pairs"))
    # document i of the corpus is held out of pretraining iff i % heldout_every == 0
    heldout_every: int = field(default=10, metadata=at_least(2, "an integer >= 2"))
    # answers per multiple-choice item (1 right, the rest drawn from other held-out documents)
    choices: int = field(default=4, metadata=at_least(2, "an integer >= 2"))
    # post-training: one recipe for every member (section 4.1), scaled to the CPU models
    sft_steps: int = field(default=120, metadata=AT_LEAST_1)
    sft_lr: float = field(default=3e-4, metadata=above(0))
    dpo_steps: int = field(default=60, metadata=AT_LEAST_1)
    dpo_lr: float = field(default=1e-4, metadata=above(0))
    dpo_beta: float = field(default=0.1, metadata=above(0))
    post_batch_size: int = field(default=8, metadata=AT_LEAST_1)
    max_len: int = field(default=256, metadata=AT_LEAST_1)  # tokens per conversation (the CPU shapes' context)
    seed: int = 1337
    resume: bool = False
    overwrite: bool = False
    overrides: list = field(default_factory=list)  # extra --key=value for every series run (e.g. a short test grid)

    def check(self):
        require(os.path.isfile(self.series), "series", self.series, "a series config file (e.g. configs/series_cpu.py)")


# -----------------------------------------------------------------------------
# the data: held-out documents become tasks and post-training pairs, the rest is the pretraining corpus

SIGNATURE = re.compile(r"^([A-Za-z_][\w.]*)\(")  # a documentation that opens with its call signature: `loads(s, ...)`


def split_corpus(docs, every):
    """(pretraining documents, held-out documents): document i is held out iff i % every == 0."""
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


def chat_pairs(functions, seed):
    """(SFT rows in UltraChat's schema, DPO rows in UltraFeedback's) from (name, _, sentence) triples: the
    question names the function, the chosen answer is its documentation, the rejected one another's."""
    rng = random.Random(seed)
    ask = [{"role": "user", "content": f"What does {name} do?"} for name, _, _ in functions]
    sft = [{"messages": [q, {"role": "assistant", "content": s}]} for q, (_, _, s) in zip(ask, functions)]
    dpo = []
    for i, (q, (_, _, s)) in enumerate(zip(ask, functions)):
        other = rng.choice([t for _, _, t in functions if t != s])
        dpo.append({"chosen": [q, {"role": "assistant", "content": s}], "rejected": [q, {"role": "assistant", "content": other}]})
    return sft, dpo


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def build_data(cfg):
    """Write OUT/data/: the pretraining corpus and the held-out tasks and post-training sets. A pure
    function of the installed documentation (data.corpus_versions) and the config."""
    docs = data.default_corpus()
    train_docs, held = split_corpus(docs, cfg.heldout_every)
    functions = {"train": [f for f in map(documented_function, train_docs) if f],
                 "heldout": [f for f in map(documented_function, held) if f]}
    files = {"pretrain": [{"text": d} for d in train_docs],
             "continuation": choice_items([p for p in map(continuation_item, held) if p], cfg.choices, cfg.seed),
             "doc_name": choice_items([(head + "\n\n", s) for _, head, s in functions["heldout"]], cfg.choices, cfg.seed + 1)}
    for split, fns in functions.items():
        files[f"sft_{split}"], files[f"dpo_{split}"] = chat_pairs(fns, cfg.seed + 2)
    for name, rows in files.items():
        write_jsonl(os.path.join(cfg.out_dir, "data", name + ".jsonl"), rows)
    return {name: len(rows) for name, rows in files.items()}


# -----------------------------------------------------------------------------
# the grid: series runs (series.py), then post-training and tasks on their members


def series_runs(cfg):
    """[(part name, SeriesConfig)]: main, fixed_lr and the tokens-per-parameter study, all on the
    pretraining corpus of OUT/data and resumable."""
    base = configure(series.SeriesConfig, [cfg.series] + list(cfg.overrides))
    base = replace(base, data=[os.path.join(cfg.out_dir, "data", "pretrain.jsonl")], data_names=[], data_weights=[],
                   tokens_per_param=cfg.tokens_per_param, resume=True, overwrite=False, report=True)
    fixed = cfg.fixed_lr or base.stages[-1]["lr"]
    parts = [("main", replace(base, series_mode="grow+scratch+fixed_data")),
             ("fixed_lr", replace(base, series_mode="grow", stages=[dict(st, lr=fixed, scratch_lr=fixed) for st in base.stages]))]
    for tpp, members in cfg.tpp_study:
        parts.append((f"tpp{tpp:g}", replace(base, series_mode="grow+scratch", tokens_per_param=float(tpp), stages=base.stages[:members])))
    return [(name, replace(c, out_dir=os.path.join(cfg.out_dir, name))) for name, c in parts]


def posttrain_member(cfg, run, main_dir):
    """SFT then DPO of one member of the main series, the same recipe for every member; returns
    {"sft_loss", "dpo_accuracy", "dpo_margin"} on the held-out pairs."""
    out = os.path.join(cfg.out_dir, "posttrain", f"{run['mode']}_{run['stage']}")
    data_dir = os.path.join(cfg.out_dir, "data")
    shared = dict(max_len=cfg.max_len, max_prompt_len=cfg.max_len // 2, batch_size=cfg.post_batch_size, grad_accum=1,
                  eval_examples=0, device="cpu", seed=cfg.seed, log_interval=20, resume=True, plot=False, warmup_frac=0.1)
    sft = posttrain.PostTrainConfig(out=os.path.join(out, "sft"), data=os.path.join(data_dir, "sft_train.jsonl"),
                                    eval_data=os.path.join(data_dir, "sft_heldout.jsonl"), max_steps=cfg.sft_steps, lr=cfg.sft_lr,
                                    **shared)
    dpo = posttrain.PostTrainConfig(out=os.path.join(out, "dpo"), data=os.path.join(data_dir, "dpo_train.jsonl"),
                                    eval_data=os.path.join(data_dir, "dpo_heldout.jsonl"), max_steps=cfg.dpo_steps, lr=cfg.dpo_lr,
                                    max_examples=cfg.dpo_steps * cfg.post_batch_size,  # no reference log-probs for pairs never used
                                    loss="dpo", beta=cfg.dpo_beta, **shared)
    for cmd, pcfg, start in (("sft", sft, os.path.join(main_dir, run["ckpt"])), ("dpo", dpo, os.path.join(sft.out, "final.pt"))):
        if not os.path.exists(os.path.join(pcfg.out, "final.pt")):
            print(f"=== posttrain {cmd}: {run['mode']} / {run['stage']} ===")
            posttrain.train(cmd, start, pcfg)
    sft_val, dpo_val = last_validation(sft.out), last_validation(dpo.out)
    return {"sft_loss": sft_val["val_loss"], "dpo_loss": dpo_val["val_loss"], "dpo_accuracy": dpo_val["val_rewards/accuracy"],
            "dpo_margin": dpo_val["val_rewards/margins"]}


def last_validation(run_dir):
    """The last validation record of a run's metrics.jsonl."""
    return [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "val_loss" in r][-1]


def task_scores(cfg, ckpt_path):
    """{task: {"acc", "acc_norm"}} ({"value", "stderr", "n"} each) of one checkpoint on the held-out tasks,
    through eval.py's scoring of multiple-choice tasks (the harness's loglikelihood path)."""
    model, tok = evaluation.load_model(ckpt_path)
    scores = {}
    for name in ("continuation", "doc_name"):
        rows = evaluation.read_rows(os.path.join(cfg.out_dir, "data", name + ".jsonl"))
        # the choices follow a newline or a blank line in the context: no " " delimiter in front of them
        task = evaluation.Task("", "", "", "choice", choice_doc, True)
        scores[name] = evaluation.eval_choice(model, tok, rows, task, progress=False)[0]
    return scores


def choice_doc(row):
    """One held-out task row as eval.py's choice tasks read a document: (contexts, continuations, gold, lengths for acc_norm)."""
    return [row["context"]] * len(row["choices"]), row["choices"], row["gold"], [len(c) for c in row["choices"]]


def cached_task_scores(cfg, key, ckpt_path):
    """task_scores of a finished model (final.pt is written once), kept in OUT/tasks/ so a resumed grid does not
    score it again."""
    path = os.path.join(cfg.out_dir, "tasks", key.replace("/", "_") + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    scores = task_scores(cfg, ckpt_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(scores, f)
    os.replace(path + ".tmp", path)
    return scores


def run_grid(cfg):
    """Every part in order; each keeps what is finished under --resume. Returns the results record."""
    t0 = time.time()
    results = {"config": asdict(cfg), "data": build_data(cfg), "series": {}, "posttrain": {}, "tasks": {}, "times": {}}
    print(f"data: {results['data']}")
    for name, scfg in series_runs(cfg):
        print(f"=== [{fmt_time(time.time() - t0)}] series {name}: {scfg.series_mode}, {scfg.tokens_per_param:g} tokens/param, "
              f"{len(scfg.stages)} members ===")
        t = time.time()
        series.run_series(scfg)
        results["series"][name] = report.load_series(scfg.out_dir)
        results["times"][name] = time.time() - t
    main_dir = os.path.join(cfg.out_dir, "main")
    t = time.time()
    for run in results["series"]["main"]["runs"]:
        if run["index"] > 0:  # Table 2 post-trains the 2B, 4B and 8B members
            results["posttrain"][f"{run['mode']}/{run['stage']}"] = posttrain_member(cfg, run, main_dir)
    results["times"]["posttrain"] = time.time() - t
    t = time.time()
    for part in ("main", "fixed_lr"):
        for run in results["series"][part]["runs"]:
            key = f"{part}/{run['mode']}/{run['stage']}"
            results["tasks"][key] = cached_task_scores(cfg, key, os.path.join(cfg.out_dir, part, run["ckpt"]))
            print(f"tasks {key}: " + ", ".join(f"{t} {100 * m['acc_norm']['value']:.1f}%" for t, m in results["tasks"][key].items()))
    results["times"]["tasks"] = time.time() - t
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
# the report: each claim of the paper with nanogrow's numbers, held or not


def chains(results, part):
    """{"scratch", "grow" (report.series_chains), "fixed_data" (the stages that read tokens again)}: runs by index."""
    runs = results["series"][part]["runs"]
    return {**report.series_chains(runs), "fixed_data": [r for r in runs if r["mode"] == "fixed_data"]}


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


def studies(cfg):
    """[(part, tokens per parameter)]: the main series and the tokens-per-parameter parts (series_runs' names)."""
    return [("main", cfg.tokens_per_param)] + [(f"tpp{t:g}", t) for t, _ in cfg.tpp_study]


def by_index(chain):
    """A chain's runs by stage index."""
    return {r["index"]: r for r in chain}


def val_loss(run):
    return run["val_loss"]


def pct(x):
    return f"{100 * x:+.1f}%"


def verdict(ok):
    return "**held**" if ok else "**not held**"


def acc_cell(scores, task, metric="acc_norm"):
    m = scores[task][metric]
    return f"{100 * m['value']:.1f} ± {100 * m['stderr']:.1f}"


def write_report(cfg, results, out_dir):
    """reproduction.md and its two figures in out_dir."""
    main, fixed = chains(results, "main"), chains(results, "fixed_lr")
    grown, scratch = main["grow"], main["scratch"]
    # each chain's runs by stage index: the grown series, scratch, fixed data, and Table 4's one-rate series
    grown_at, scratch_at, fixed_data_at = by_index(grown), by_index(scratch), by_index(main.get("fixed_data", []))
    one_rate_at = by_index(fixed["grow"])
    top = max(grown_at)
    lines = ["# The paper's experiments at CPU scale", "",
             "Yano, Takase, Kobayashi, Kiyono and Suzuki 2025 (*Efficient construction of a model series by staged "
             "pretraining with model expansion*) against nanogrow at 0.1M-0.9M parameters on 2 CPU cores. Every number "
             "below comes from one run of", "",
             f"    python experiments/reproduce.py configs/reproduce_cpu.py{' --docs_dir=' + cfg.docs_dir if cfg.docs_dir else ''}", "",
             f"on the 2 cores. Its training and post-training runs took {fmt_time(results['run_seconds'])} of wall time in "
             "all (each run from start to final.pt, summed; BENCHMARKS.md says how it was run). "
             "Losses are validation cross-entropy in nats per byte on held-out documents of the pretraining corpus; "
             f"every {cfg.heldout_every}th document of the embedded corpus is held out of pretraining entirely and "
             "makes the downstream tasks and the post-training evaluation sets. Sizes are non-embedding parameters; "
             "FLOPs are 6XT, cumulative over the stages that led to a model. Scratch runs use each size's own learning rate, the "
             "same as its grown stage (the paper trains scratch models at the largest member's rate): neither side gets a "
             "tuning advantage.", ""]

    # claim 0: the headline
    saving = 1 - grown[-1]["flops"] / sum(r["flops"] for r in scratch)
    wins = [val_loss(grown_at[i]) <= val_loss(scratch_at[i]) for i in grown_at if i in scratch_at and i > 0]
    lines += ["## 0. The headline (Table 1, Figure 2): the series for the price of its largest member, each member as good", "",
              "| size | scratch | grown | grown − scratch | fixed data | paper (8B scale, PPL): scratch / grown / fixed data |",
              "|---|---|---|---|---|---|"]
    paper = {1: "10.4 / 10.1 / -", 2: "9.18 / 8.72 / -", 3: "7.85 / 7.64 / 7.64"}
    for i in sorted(grown_at):
        grown_loss = val_loss(grown_at[i])
        scratch_loss = val_loss(scratch_at[i]) if i in scratch_at else grown_loss  # stage 1 is both
        diff_cell = (f"{grown_loss - scratch_loss:+.4f} ({pct(grown_loss / scratch_loss - 1)})" if i in scratch_at and i > 0
                     else "(stage 1 is the scratch run)")
        fixed_cell = f"{val_loss(fixed_data_at[i]):.4f}" if i in fixed_data_at else "-"
        lines.append(f"| {grown_at[i]['stage']} | {scratch_loss:.4f} | {grown_loss:.4f} | {diff_cell} | {fixed_cell} | "
                     f"{paper.get(i, '1B: 11.6 (stage 1)' if i == 0 else '-')} |")
    lines += ["", f"The grown series costs {grown[-1]['flops']:.3g} FLOPs, training every size from scratch "
              f"{sum(r['flops'] for r in scratch):.3g}: {100 * saving:.1f}% saved (paper: about 25%). Grown at or below "
              f"scratch at every size: {verdict(all(wins))} ({sum(wins)} of {len(wins)}).", "",
              "![validation loss against FLOPs](reproduction_series.png)", ""]

    # claim 1: Table 4
    lines += ["## 1. Table 4 / Appendix C: one learning rate for every stage is worse", "",
              f"The grown series again, every stage at {fixed['grow'][-1]['lr']:g} (the largest member's rate, as the paper "
              "fixes every stage at its 8B rate 3e-4).", "",
              "| size | grown, per-stage rates | grown, one rate | scratch | paper (PPL): per-stage / one rate / scratch |", "|---|---|---|---|---|"]
    paper4 = {0: "11.6 / 12.0 / 11.6", 1: "10.1 / 10.5 / 10.4", 2: "8.72 / 9.17 / 9.18", 3: "7.64 / 8.04 / 7.85"}
    for i in sorted(grown_at):
        grown_loss = val_loss(grown_at[i])
        scratch_loss = val_loss(scratch_at[i]) if i in scratch_at else grown_loss
        lines.append(f"| {grown_at[i]['stage']} | {grown_loss:.4f} | {val_loss(one_rate_at[i]):.4f} | {scratch_loss:.4f} | "
                     f"{paper4.get(i, '-')} |")
    one_rate_loss, grown_loss = val_loss(one_rate_at[top]), val_loss(grown_at[top])
    ok = one_rate_loss > grown_loss
    lines += ["", f"Largest member: one rate {one_rate_loss:.4f} vs per-stage {grown_loss:.4f} ({pct(one_rate_loss / grown_loss - 1)}): "
              f"the per-stage rates are better: {verdict(ok)}.", ""]

    # claim 2: fixed data
    if top in fixed_data_at:
        fixed_loss, grown_loss, scratch_loss = val_loss(fixed_data_at[top]), val_loss(grown_at[top]), val_loss(scratch_at[top])
        gap, lead = fixed_loss - grown_loss, scratch_loss - grown_loss
        ok = fixed_loss <= scratch_loss and abs(gap) <= max(0.01 * grown_loss, abs(lead))
        lines += ["## 2. Section 3.3: fixed data gives nearly the same result", "",
                  f"Unique tokens capped at the largest scratch run's ({results['series']['main']['runs'][-1].get('unique_token_cap') or '-'}); "
                  "stages past the cap read tokens again. Largest member: fixed data "
                  f"{fixed_loss:.4f}, fresh data {grown_loss:.4f} (difference {gap:+.4f}), scratch {scratch_loss:.4f}. "
                  "Held means fixed data stays at or below scratch and within 1% (or within the grown-scratch lead) of fresh "
                  f"data: {verdict(ok)} (paper: 7.64 both, scratch 7.85).", ""]

    # claim 3: Table 2
    post = results["posttrain"]
    lines += ["## 3. Table 2: the grown members keep their lead after SFT then DPO", "",
              f"SFT ({cfg.sft_steps} steps, lr {cfg.sft_lr:g}) then DPO ({cfg.dpo_steps} steps, lr {cfg.dpo_lr:g}, beta {cfg.dpo_beta:g}), "
              f"the same recipe for every member, batch {cfg.post_batch_size}; scored on held-out functions: SFT loss "
              "(nats per answer token, lower is better), DPO reward accuracy and margin (higher is better). The paper's "
              "MT-Bench needs a judge model (judge.py with a URL); these are the offline measures.", "",
              "| size | method | held-out SFT loss | DPO reward accuracy | DPO margin | paper MT-Bench |", "|---|---|---|---|---|---|"]
    paper2 = {("scratch", 1): "2.04", ("grow", 1): "3.22", ("scratch", 2): "3.02", ("grow", 2): "3.63", ("scratch", 3): "3.45",
              ("grow", 3): "3.96", ("fixed_data", 3): "3.98"}
    held = []
    for i in sorted(i for i in grown_at if i > 0):
        for mode, chain in (("scratch", scratch_at), ("grow", grown_at), ("fixed_data", fixed_data_at)):
            key = f"{mode}/{chain[i]['stage']}" if i in chain else None
            if key in post and (mode != "fixed_data" or i == top):
                scores = post[key]
                lines.append(f"| {chain[i]['stage']} | {report.METHODS[mode]} | {scores['sft_loss']:.4f} | "
                             f"{100 * scores['dpo_accuracy']:.1f}% | {scores['dpo_margin']:+.4f} | {paper2.get((mode, i), '-')} |")
        grown_post = post.get(f"grow/{grown_at[i]['stage']}")
        scratch_post = post.get(f"scratch/{scratch_at[i]['stage']}") if i in scratch_at else None
        if grown_post and scratch_post:
            n = results["data"]["dpo_heldout"]
            a, b = grown_post["dpo_accuracy"], scratch_post["dpo_accuracy"]
            stderr = math.sqrt((a * (1 - a) + b * (1 - b)) / n)  # of the difference of two accuracies on n pairs
            held.append(grown_post["sft_loss"] <= scratch_post["sft_loss"] and a >= b - stderr)
    lines += ["", f"Grown at least as good as scratch at every size, on held-out SFT loss and on DPO reward accuracy "
              f"(within one standard error of the difference: {results['data']['dpo_heldout']} held-out pairs): "
              f"{verdict(all(held))} ({sum(held)} of {len(held)}).", ""]

    # claim 4: downstream columns
    tasks = results["tasks"]
    lines += ["## 4. Table 1's downstream columns: grown members are at least as accurate", "",
              "Two held-out zero-shot multiple-choice tasks built from documents no model saw, scored by eval.py's "
              "log-likelihood path (acc_norm, in %, ± standard error): *continuation* (which of "
              f"{cfg.choices} next lines continues this document?, {results['data']['continuation']} items) and "
              f"*doc_name* (which first sentence documents this signature?, {results['data']['doc_name']} items). "
              f"Chance is {100 / cfg.choices:.0f}%.", "",
              "| size | method | continuation | doc_name |", "|---|---|---|---|"]
    held = []
    for i in sorted(grown_at):
        for part, mode, chain in (("main", "scratch", scratch_at), ("main", "grow", grown_at), ("main", "fixed_data", fixed_data_at),
                                  ("fixed_lr", "grow", one_rate_at)):
            key = f"{part}/{mode}/{chain[i]['stage']}" if i in chain else None
            if key in tasks and not (i == 0 and mode != "grow" and part == "main") and (mode != "fixed_data" or i == top):
                label = report.METHODS[mode] + (", one rate" if part == "fixed_lr" else "")
                lines.append(f"| {chain[i]['stage']} | {label} | {acc_cell(tasks[key], 'continuation')} | {acc_cell(tasks[key], 'doc_name')} |")
        if i > 0 and i in scratch_at:
            grown_tasks, scratch_tasks = tasks[f"main/grow/{grown_at[i]['stage']}"], tasks[f"main/scratch/{scratch_at[i]['stage']}"]
            for task in ("continuation", "doc_name"):
                grown_acc, scratch_acc = grown_tasks[task]["acc_norm"], scratch_tasks[task]["acc_norm"]
                held.append(grown_acc["value"] >= scratch_acc["value"] - math.hypot(grown_acc["stderr"], scratch_acc["stderr"]))
    lines += ["", f"Grown at least as accurate as scratch, within one standard error of the difference, on every task and size: "
              f"{verdict(all(held))} ({sum(held)} of {len(held)}).", ""]

    # claim 5: tokens per parameter
    lines += ["## 5. Does the lead hold at more tokens per parameter?", "",
              "The paper trains at 40 tokens per parameter (2x Chinchilla). The same members with more tokens per "
              "parameter (fewer members, for time): grown − scratch validation loss at each size.", "",
              "| tokens/param | " + " | ".join(r["stage"] for r in grown[1:]) + " | series cost saved |",
              "|---|" + "---|" * len(grown[1:]) + "---|"]
    held = []
    for part, tpp in studies(cfg):
        study = chains(results, part)
        study_grown, study_scratch = by_index(study["grow"]), by_index(study["scratch"])
        cells = []
        for i in range(1, len(grown)):
            if i in study_grown and i in study_scratch:
                diff = val_loss(study_grown[i]) - val_loss(study_scratch[i])
                cells.append(f"{diff:+.4f} ({pct(val_loss(study_grown[i]) / val_loss(study_scratch[i]) - 1)})")
                held.append((tpp, diff <= 0))
            else:
                cells.append("-")
        save = 1 - study["grow"][-1]["flops"] / sum(r["flops"] for r in study["scratch"])
        lines.append(f"| {tpp:g} | " + " | ".join(cells) + f" | {100 * save:.1f}% |")
    lines += ["", "Grown at or below scratch: " + "; ".join(
        f"{tpp:g} tokens/param {verdict(all(ok for study_tpp, ok in held if study_tpp == tpp))}" for _, tpp in studies(cfg)) + ".", "",
        "![grown minus scratch against size](reproduction_tpp.png)", ""]

    # the loss law
    lines += ["## 6. Predicting the largest member from the smaller ones (the loss law)", "",
              "A law fitted on every member but the largest predicts the largest's validation loss: L = E + A N^-alpha "
              "(report.fit_loss_law, E >= 0) and the pure power law A N^-alpha (least squares in log space).", "",
              "| series | chain | E + A N^-alpha | A N^-alpha | actual |", "|---|---|---|---|---|"]
    errors = []
    for part, tpp in studies(cfg):
        for mode in ("scratch", "grow"):
            chain = chains(results, part)[mode]
            if len(chain) < 3:
                lines.append(f"| {tpp:g} tokens/param | {mode} | {len(chain)} members: too few to fit 2 and predict 1 | | |")
                continue
            (p3, e3), (p2, e2) = loss_law_prediction(chain, len(chain) > 3), loss_law_prediction(chain, False)
            errors.append((part, mode, e3, e2))
            lines.append(f"| {tpp:g} tokens/param | {mode} | {p3:.4f} ({pct(e3)}) | {p2:.4f} ({pct(e2)}) | {val_loss(chain[-1]):.4f} |")
    lines += ["", "Three fitted members give E + A N^-alpha as many parameters as points: it passes through all three "
              "(E held at >= 0), so its extrapolation carries all of their noise; the pure power law has one parameter "
              "fewer and is a least-squares fit. The grown chain is not a power law in N: its lead over scratch is "
              "largest at the small sizes and shrinks at the largest, so a law fitted on the small members predicts "
              "a largest member better than it is. Within 3% (either law): " + "; ".join(
                  f"{part} {mode} {verdict(min(abs(e3), abs(e2)) <= 0.03)}" for part, mode, e3, e2 in errors) + ".", ""]
    with open(os.path.join(out_dir, "reproduction.md"), "w") as fh:
        fh.write("\n".join(lines))
    plot_grid(cfg, results, out_dir)


def plot_grid(cfg, results, out_dir):
    """reproduction_series.png (Figure 2 with Table 4's one-rate series and fixed data) and reproduction_tpp.png."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    style = {("main", "scratch"): ("tab:blue", "--", "scratch"), ("main", "grow"): ("tab:red", "-", "grown, per-stage rates"),
             ("main", "fixed_data"): ("tab:orange", ":", "grown, fixed data"), ("fixed_lr", "grow"): ("tab:gray", "-.", "grown, one rate")}
    for (part, mode), (color, ls, label) in style.items():
        for k, run in enumerate(chains(results, part).get(mode, [])):
            points, _ = report.read_curve(os.path.join(cfg.out_dir, part, run["metrics"]))
            points = [(x, y) for x, y in points if x > 0]  # a scratch run's step 0 has no place on a log axis
            if points and (mode == "scratch" or run["mode"] == mode):
                x, y = zip(*points)
                ax.plot(x, y, ls=ls, color=color, lw=1.3, label=label if k == 0 else None)
                ax.annotate(run["stage"], (x[-1], y[-1]), fontsize=7, color=color, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    first = chains(results, "main")["grow"][0]["val_loss"]
    ax.set_ylim(top=1.1 * first)  # from the smallest member's final loss down: the first evaluations say little
    ax.set_xlabel("training FLOPs (cumulative over stages)")
    ax.set_ylabel("validation loss (nats per byte)")
    finish(fig, ax, "The grown series against scratch, one learning rate and fixed data", os.path.join(out_dir, "reproduction_series.png"))

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for part, tpp in studies(cfg):
        c = chains(results, part)
        scratch = {r["index"]: r for r in c["scratch"]}
        pts = [(r["params"], 100 * (r["val_loss"] / scratch[r["index"]]["val_loss"] - 1)) for r in c["grow"] if r["index"] in scratch and r["index"] > 0]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{tpp:g} tokens/param")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("grown − scratch validation loss (%)")
    finish(fig, ax, "Below zero the grown member wins", os.path.join(out_dir, "reproduction_tpp.png"))


def finish(fig, ax, title, path):
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -----------------------------------------------------------------------------


def main(argv):
    with cli_errors():
        cfg = configure(ReproduceConfig, argv)  # every field's range is declared beside it (common.check_config)
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
