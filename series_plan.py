"""
series_plan.py: the bookkeeping around series.py's method: what --plan prints and checks, the record, the logs.

    python series.py configs/series_paper.py --plan        # every run's tokens, passes over the data and FLOPs; no training

series.py holds the method (the members and their budgets, training and growing them, the grown series, the baselines
and branches); this file holds what it checks, counts and records on the way, in this order: a series config's parts
(the TrainConfig every run is given, a stage's dict checked), the process (rank, log, a run's steps), a member's wsd
budgets (its trunk's and cooldown's tokens, which the plan counts and the grown series trains), the data plan (what
every run reads against the unique tokens of its source: a plan that repeats the data more than max_passes times is
refused), and the record (series.json, the --resume check, the report, the plan's log line).
"""

import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch

import budget
import data
import report
from checkpoint import load_checkpoint
from common import ConfigError, require
from model import config_from_shape
from train import TrainConfig, data_dirs


# -----------------------------------------------------------------------------
# a series config's parts: the TrainConfig every run is given, and a stage's dict, checked

STAGE_KEYS = ("name", "shape", "lr", "scratch_lr", "warmup_steps", "moe_experts", "moe_top_k", "activation_checkpointing")


def train_config(cfg):
    """The TrainConfig part of a SeriesConfig (what one run of train.py is given)."""
    return TrainConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainConfig)})


def member_config(cfg, i, st, vocab_size):
    """The ModelConfig of stage i's dict, after checking the dict: one ConfigError naming the stage and key."""
    unknown = set(st) - set(STAGE_KEYS) if isinstance(st, dict) else None
    if unknown is None or unknown or "shape" not in st or "lr" not in st:
        raise ConfigError(f"stage {i + 1} {st}: a stage is dict(name=, shape=, lr=[, scratch_lr=, warmup_steps=, "
                          "moe_experts=, moe_top_k=, activation_checkpointing=])"
                          + (f"; unknown keys {sorted(unknown)}" if unknown else ""))
    for key in ("lr", "scratch_lr"):
        value = st.get(key, st["lr"])
        require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"stage {i + 1} {key}", value,
                "a finite number > 0")
    warmup = st.get("warmup_steps", 0)
    require(isinstance(warmup, int) and warmup >= 0, f"stage {i + 1} warmup_steps", warmup, "an integer >= 0")
    checkpointing = st.get("activation_checkpointing", cfg.activation_checkpointing)
    require(isinstance(checkpointing, bool), f"stage {i + 1} activation_checkpointing", checkpointing, "True or False")
    moe = {k: st[k] for k in ("moe_experts", "moe_top_k") if k in st}
    for key, value in moe.items():
        require(isinstance(value, int) and not isinstance(value, bool), f"stage {i + 1} {key}", value, "an integer")
    try:
        vocab = {"vocab_size": vocab_size} if vocab_size else {}  # none: the shape's own (print_plan without a tokenizer)
        return config_from_shape(st["shape"], max_seq_len=cfg.seq_len, **vocab, **moe)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"stage {i + 1}: shape {st['shape']!r}: {e}") from None


# -----------------------------------------------------------------------------
# the process: which rank this is, its log, the optimizer steps of a run, a checkpoint's shapes (grow_member)


def rank():
    return int(os.environ.get("RANK", 0))


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))


def log(*args):
    if rank() == 0:
        print(*args)


def steps_for(cfg, tokens):
    """Optimizer steps that read `tokens` tokens (the last step whole): where the next stage's data starts."""
    return math.ceil(tokens / (cfg.batch_size * cfg.seq_len * cfg.grad_accum * world_size()))


def on_meta(tree):
    """The same nesting of dicts and lists with every tensor on the meta device: its shape, no memory."""
    if isinstance(tree, dict):
        return {k: on_meta(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [on_meta(v) for v in tree]
    return tree.to("meta") if isinstance(tree, torch.Tensor) else tree


# -----------------------------------------------------------------------------
# a member's wsd budgets (grow_schedule "wsd": series.train_grown_series, cooldown)


def trunk_tokens(cfg, stage):
    """Tokens of a grown series' stage: its staged budget, or under grow_schedule "wsd" the trunk's 1 - decay_frac of
    it (the member's cooldown branch spends the rest of its FLOPs)."""
    if cfg.grow_schedule != "wsd":
        return stage.staged_tokens
    return max(1, round((1 - cfg.decay_frac) * stage.staged_tokens))


def cooldown_tokens(cfg, stage):
    """Tokens of a member's cooldown branch under grow_schedule "wsd": decay_frac of its scratch tokens T_i, as a WSD
    scratch run of that size decays over its last decay_frac. The trunk reaches the member on (1 - decay_frac) of
    FLOPs(X_i, T_i) (the staged budget up to it), the branch spends decay_frac of it: the finished member has cost
    FLOPs(X_i, T_i), as its scratch twin."""
    return max(1, round(cfg.decay_frac * stage.scratch_tokens))


def cooldown_flops(cfg, stages):
    """FLOPs of the wsd cooldown branches of these members (the series' cost on top of the staged budget, for all
    members but the last, whose cooldown ends the trunk's budget)."""
    return sum(budget.flops(s.params, cooldown_tokens(cfg, s)) for s in stages)


# -----------------------------------------------------------------------------
# the data plan: what every arm reads against the unique tokens its sources hold, checked before any training
#   python series.py CONFIG --plan    # print it and exit; a run checks the same before it trains

# Unique tokens of named Hugging Face sources, for a plan made before the data is downloaded (a prepared source's
# meta.json counts exactly and wins): (the source as data gives it, without "hf:" and "@split"; tokenizer) -> tokens,
# the whole source as its dataset card counts it in GPT-2 tokens. HuggingFaceFW/fineweb-edu's card: FineWeb-Edu holds
# 1.3T tokens, its samples about 10B, 100B and 350B; HuggingFaceFW/fineweb's: 15T, the same samples.
KNOWN_SOURCE_TOKENS = {
    ("HuggingFaceFW/fineweb-edu", "gpt2"): 1.3e12,
    ("HuggingFaceFW/fineweb-edu:sample-10BT", "gpt2"): 10e9,
    ("HuggingFaceFW/fineweb-edu:sample-100BT", "gpt2"): 100e9,
    ("HuggingFaceFW/fineweb-edu:sample-350BT", "gpt2"): 350e9,
    ("HuggingFaceFW/fineweb", "gpt2"): 15e12,
    ("HuggingFaceFW/fineweb:sample-10BT", "gpt2"): 10e9,
    ("HuggingFaceFW/fineweb:sample-100BT", "gpt2"): 100e9,
    ("HuggingFaceFW/fineweb:sample-350BT", "gpt2"): 350e9,
}


@dataclass
class Source:
    name: str  # as cfg.data gives it
    share: float  # of every batch's rows (data_weights)
    unique_tokens: int | None  # what a pass over it reads; None: unknown until it is prepared
    counted_by: str  # where unique_tokens comes from


def data_sources(cfg):
    """Every source of cfg.data with its share of each batch and the unique tokens it holds: the train split of its
    prepared meta.json in data_dir, when prepared as this config prepares it (exact), else cfg.data_unique_tokens, else
    KNOWN_SOURCE_TOKENS (both capped at max_data_tokens, which preparation stops at), else unknown."""
    weights = cfg.data_weights or [1.0] * len(cfg.data)
    recorded = cfg.data_unique_tokens or [0] * len(cfg.data)
    sources = []
    for name, folder, weight, count in zip(cfg.data, data_dirs(cfg), weights, recorded):
        meta_path = os.path.join(folder, "meta.json")  # written last: its presence means the token files are whole
        meta = {}
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        known = KNOWN_SOURCE_TOKENS.get((name[len("hf:"):].partition("@")[0], cfg.tokenizer)) if name.startswith("hf:") else None
        if meta and meta.get("args", {}).get("max_tokens") == (cfg.max_data_tokens or None):  # else train.py prepares it again
            tokens, how = meta["splits"]["train"]["tokens"], f"prepared: {meta_path}"
        elif count or known:
            tokens, how = count or known, "data_unique_tokens" if count else "its dataset card (series_plan.KNOWN_SOURCE_TOKENS)"
            if cfg.max_data_tokens and cfg.max_data_tokens < tokens:
                tokens, how = cfg.max_data_tokens, how + f", prepared up to max_data_tokens={cfg.max_data_tokens:.4g}"
        else:
            tokens, how = None, "unknown until prepared (python data.py prepare, or data_unique_tokens)"
        sources.append(Source(name, weight / sum(weights), None if tokens is None else round(tokens), how))
    return sources


@dataclass
class PlanRow:
    arm: str  # grow, scratch, fixed_data, branch; under grow_schedule "wsd" the grown arms' "trunk" and "cooldown" runs
    stage: str
    params: int  # X (active, for a mixture of experts)
    tokens: int  # what this run trains on
    start: int  # where in its arm's data stream it starts: the tokens the runs before it read (stages read on)
    flops: int  # 6 X tokens; 0 for a run another arm trains (shared)
    shared: str  # the arm whose run this is ("" when this arm trains it)
    passes: float | None  # over the unique tokens of the source it repeats most (under the fixed-data cap, the cap's)
    unique: int | None  # those unique tokens
    source: str  # that source
    cap_binds: bool | None  # fixed_data: the cap is below the source's unique tokens and this run reads past it


def plan_data(cfg, stages, cap, sources):
    """A PlanRow for every run of every arm, in run_series' order. Each arm's runs read one data stream from its start:
    the grown arms' stages read on where the stage before stopped, each scratch run from the start, each branch from
    where init_from's run stopped. The passes are tokens read through the end of the run over the unique tokens
    (data.BatchLoader's epochs); fixed_data reads at most `cap` unique tokens of each source (section 3.3)."""
    modes = cfg.series_mode.split("+")
    runs = []  # (arm, stage, tokens, start, shared)
    if "branch" in modes:
        state = load_checkpoint(cfg.init_from, mmap=True).get("data_state") or {}
        start = state.get("step", 0) * math.prod(state.get(k, 1) for k in ("batch_size", "seq_len", "grad_accum", "world_size"))
        runs += [("branch", s, s.staged_tokens, start, "") for s in stages]
    for arm in ("grow", "scratch", "fixed_data"):
        if arm not in modes:
            continue
        if arm == "scratch":
            runs += [(arm, s, s.scratch_tokens, 0, "grow" if s.index == 0 and "grow" in modes else "") for s in stages]
            continue
        read, wsd = 0, cfg.grow_schedule == "wsd"
        for s in stages:
            shared = "grow" if arm == "fixed_data" and "grow" in modes and not s.repeats_in_fixed_data else ""
            runs.append((arm + " trunk" if wsd else arm, s, trunk_tokens(cfg, s), read, shared))
            read += trunk_tokens(cfg, s)
            if wsd:  # the cooldown reads on from the trunk's end; the next trunk reads those tokens too
                runs.append((arm + " cooldown", s, cooldown_tokens(cfg, s), read, shared))
    rows = []
    for arm, s, tokens, start, shared in runs:
        capped = cap if arm.startswith("fixed_data") else 0
        worst, binds = (None, None, ""), None
        for src in sources:
            if src.unique_tokens is None:
                continue
            read = src.share * (start + tokens)
            unique = min(src.unique_tokens, capped) if capped else src.unique_tokens
            if worst[0] is None or read / unique > worst[0]:
                worst = (read / unique, unique, src.name)
            if capped:
                binds = bool(binds) or (capped < src.unique_tokens and read > capped)
        rows.append(PlanRow(arm, s.name, s.params, tokens, start, 0 if shared else budget.flops(s.params, tokens), shared,
                            *worst, binds))
    return rows


def check_passes(cfg, rows):
    """Refuse, in one line, a plan that reads a source more than max_passes times (before any training)."""
    over = [r for r in rows if r.passes is not None and r.passes > cfg.max_passes]
    if over:
        r = max(over, key=lambda r: r.passes)
        arms = sorted({o.arm for o in over})
        raise ConfigError(
            f"the plan reads {r.source} {r.passes:.2f} times ({r.arm} {r.stage}: {report.human(r.start + r.tokens)} tokens "
            f"of its {report.human(r.unique)} unique), more than max_passes={cfg.max_passes:g} (arms over it: {', '.join(arms)}): "
            "use a source with more unique tokens (FineWeb-Edu's sample-350BT or full set), fewer tokens_per_param, or "
            f"raise max_passes; python series.py CONFIG --plan prints the plan")


def print_data_plan(cfg, stages, cap, counted=""):
    """--plan: the members, the sources, a row per run of every arm (tokens, where in its stream it reads, passes,
    whether the fixed-data cap binds, FLOPs) and the FLOPs of each arm; then check_passes. Trains nothing, downloads
    nothing: a source's unique tokens come from its prepared meta.json or a recorded count (data_sources)."""
    sources = data_sources(cfg)
    rows = plan_data(cfg, stages, cap, sources)
    modes = cfg.series_mode.split("+")
    print(f"plan: {len(stages)} stages, arms {', '.join(modes)}, "
          + (f"{cfg.branch_flops:.3g} FLOPs per branch from {cfg.init_from}" if modes == ["branch"] else
             f"{cfg.tokens_per_param:g} tokens per parameter, grow_schedule {cfg.grow_schedule}")
          + f"; X = non-embedding parameters{' (active)' if any(s.config.moe_experts for s in stages) else ''}, "
          f"FLOPs = 6 X T (budget.py){counted}")
    for src in sources:
        print(f"data {src.name} ({cfg.tokenizer}, {src.share:.0%} of each batch): "
              + (f"{report.human(src.unique_tokens)} unique tokens" if src.unique_tokens is not None else "unique tokens unknown")
              + f", {src.counted_by}")
    if "fixed_data" in modes:
        print(f"fixed-data cap (section 3.3): {report.human(cap)} unique tokens per source, the largest member's scratch run")
    table = [[r.arm, r.stage, report.human(r.params), report.human(r.tokens),
              f"{report.human(r.start)} -> {report.human(r.start + r.tokens)}",
              "?" if r.unique is None else report.human(r.unique), "?" if r.passes is None else f"{r.passes:.2f}",
              {None: "", True: "yes", False: "no"}[r.cap_binds], f"= {r.shared}" if r.shared else f"{r.flops:.3g}"]
             for r in rows]
    print(report.markdown_table(["arm", "stage", "X", "tokens", "stream read", "unique", "passes", "cap binds", "FLOPs"], table))
    arms = list(dict.fromkeys(r.arm.split()[0] for r in rows))
    flops = {a: sum(r.flops for r in rows if r.arm.split()[0] == a) for a in arms}
    print("FLOPs by arm: " + ", ".join(f"{a} {f:.3g}" for a, f in flops.items()) + f"; in all {sum(flops.values()):.3g} "
          "(python budget.py CONFIG --gpus N --mfu M: GPU-hours)")
    if "fixed_data" in modes and not any(r.cap_binds for r in rows):
        print(f"warning: the fixed-data cap never binds (no source holds more than {report.human(cap)} unique tokens): "
              "fixed_data's runs read what grow's read and train them again")
    known = [r.passes for r in rows if r.passes is not None]
    if known:
        print(f"most passes: {max(known):.2f}, limit max_passes={cfg.max_passes:g}")
    if any(s.unique_tokens is None for s in sources):
        print("passes over a source of unknown size are checked when a run has prepared it, before it trains")
    check_passes(cfg, rows)


# -----------------------------------------------------------------------------
# the record of a series: series.json, one entry per finished run (report.py reads it)


@dataclass
class SeriesRun:
    mode: str
    stage: str  # the stage's name
    index: int
    params: int
    model_config: dict
    tokens: int  # tokens of this stage's own run
    flops: int  # the lineage's FLOPs so far: for a grown stage, every earlier stage's too
    val_loss: float
    val_bpb: float
    ckpt: str  # paths relative to the series' out_dir
    metrics: str
    lr: float
    unique_token_cap: int | None
    finished: bool = True  # its schedule ended at min_lr (under grow_schedule "continue" only the last member's does)
    schedule: str = ""  # the run's own: "cosine", "constant", "wsd decay_frac=0.2", with its span when not the whole
    series_flops: int = 0  # FLOPs the series had spent when this member was done: flops plus earlier wsd cooldowns


def write_series_json(cfg, runs):
    """out_dir/series.json, rewritten atomically after each run (a killed series leaves a whole file)."""
    tokenizer = data.get_tokenizer(cfg.tokenizer)
    path = os.path.join(cfg.out_dir, "series.json")
    record = {"config": asdict(cfg), "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size},
              "runs": [asdict(r) for r in runs]}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)



# what a --resume may change: how the runs are carried out and reported, not what they compute (and series_mode,
# each of whose runs trains the same whichever modes run beside it)
RESUMABLE_CHANGES = ("out_dir", "resume", "overwrite", "report", "plot", "log_interval", "eval_interval", "keep_last", "ckpt_interval",
                     "dist_timeout", "peak_flops", "compile", "device", "data_dir", "activation_checkpointing", "series_mode",
                     "max_passes", "data_unique_tokens", "plan")


def check_resume_plan(cfg):
    """--resume keeps the finished runs, so it continues the plan series.json records: a config that differs from it in
    anything but RESUMABLE_CHANGES (more tokens per parameter, other stages, another growth recipe) is refused with
    one line naming what differs, instead of a series.json that records a plan its runs did not follow."""
    path = os.path.join(cfg.out_dir, "series.json")
    if not (cfg.resume and os.path.exists(path)):
        return
    with open(path) as f:
        saved = json.load(f).get("config", {})
    now = json.loads(json.dumps(asdict(cfg)))  # as series.json holds it (tuples as lists)
    differ = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k in saved and k not in RESUMABLE_CHANGES and saved[k] != v]
    if differ:
        raise ConfigError(f"--resume: {path} records another plan ({'; '.join(differ)}), and its finished runs follow it: "
                          "restore those settings to continue it, or choose a new out_dir (or --overwrite to start over)")


def write_report(out_dir):
    """report.md (the paper's Table 1) and series.png (its Figure 2) from series.json."""
    table = report.series_report(out_dir)
    report.plot_series(out_dir, os.path.join(out_dir, "series.png"))
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(table + "\n")
    log(table)
    log(f"report: {os.path.join(out_dir, 'report.md')}, figure: {os.path.join(out_dir, 'series.png')}")


def log_plan(cfg, stages):
    """One line: every member's size and token budgets, and what the grown series saves (budget.summarize)."""
    if cfg.series_mode == "branch":
        log(f"{len(stages)} branches from {cfg.init_from}, {cfg.branch_flops:.3g} FLOPs each: "
            + ", ".join(f"{s.name} X_active={s.params:,} {s.staged_tokens:,} tokens" for s in stages))
        return
    summary = budget.summarize(budget.staged_budget([s.params for s in stages], cfg.tokens_per_param, [s.name for s in stages]))
    log(f"series of {len(stages)} stages, modes {cfg.series_mode.split('+')}, {cfg.tokens_per_param:g} tokens per parameter: "
        + ", ".join(f"{s.name} X={s.params:,} scratch {s.scratch_tokens:,} / staged {s.staged_tokens:,} tokens" for s in stages)
        + f" | staged {summary.staged_flops:.3g} FLOPs vs scratch {summary.scratch_flops:.3g} ({summary.saving:.1%} saved)"
        + (f" | wsd: every member finished by a cooldown of {cfg.decay_frac:.0%} of its tokens, the earlier members' "
           f"{cooldown_flops(cfg, stages[:-1]):.3g} FLOPs on top" if cfg.grow_schedule == "wsd" else ""))
