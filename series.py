"""
series.py: the staged series of Yano et al. 2025 (section 2.2), on top of train.py and grow.py.

    python series.py configs/series_cpu.py                 # the CPU demo: grown and scratch series, the report
    python series.py configs/series_cpu.py --resume        # after a kill: finished stages kept, the cut one resumed
    python series.py configs/series_paper.py --plan        # every run's tokens, passes over the data and FLOPs; no training
    torchrun --standalone --nproc_per_node=8 series.py configs/series_paper.py

The algorithm, for members X_1 < X_2 < ... < X_n (non-embedding parameters), each with the scratch
budget FLOPs(X_i, T_i) = 6 X_i T_i at T_i = tokens_per_param * X_i (section 2.1):

    stage 1:    train X_1 from scratch on T_1 tokens
    stage i+1:  grow stage i's final model into X_{i+1} (grow.py: function preserving), then train it on
                (FLOPs(X_{i+1}, T_{i+1}) - FLOPs spent by stages 1..i) / (6 X_{i+1}) tokens

so the whole series costs what training its largest member alone costs (budget.staged_budget). Beside
it, the baselines the paper compares against: every size trained alone from scratch ("scratch"), and the
grown series with unique data capped at the largest scratch run's ("fixed_data", section 3.3), where
the later stages read tokens again. series.json lists every finished run; report.py turns it into the
paper's Table 1 (report.md) and Figure 2 (series.png).

The paper evaluates every member as a finished model: trained to the end of a learning-rate schedule. grow_schedule
"restart" (a schedule per stage: a cosine) and "wsd" finish every member; "continue" (one schedule over
the series) finishes only the last. "wsd" is MiniCPM's warmup-stable-decay (Hu et al. 2024, section 4) made a
series: a trunk grows at each stage's stable rate and never decays, and each member is finished by a short
cooldown branch from the trunk's state at that member, whose FLOPs the series pays on top (series_flops). The
trunk continues from the state before the cooldown, and the scratch baselines decay over the same fraction.

A stage with moe_experts > 0 is a mixture of experts (model.SparseMoE), upcycled from the stage before
when grown (grow.py, rule U) and budgeted by its active parameters. series_mode "branch" continues one
trained checkpoint (init_from) several ways at equal compute: every stage is grown from it into its own
shape and trains for branch_flops (configs/series_moe_cpu.py: the demo's largest member, dense vs upcycled).

The file reads in the method's order: the config, the plan (every member's shape and budget, checked before
any training), training one member, growing one member, the grown series, the scratch baselines, the branches,
and run_series, which runs them all. What it counts and records on the way (the data plan that --plan prints and
that refuses more than max_passes over a source, series.json, the report, the logs) is series_plan.py's.
"""

import math
import os
import sys
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

import budget
import data
import grow
from checkpoint import Lineage, checkpoint_config, claim_out_dir, load_checkpoint, model_from_checkpoint
from common import ConfigError, above, at_least, check_config, cli_errors, configure, one_of, require, rule
from model import Llama, ModelConfig, config_from_dict
from parallel import on_rank0_then_share, setup_distributed
from series_plan import (SeriesRun, check_passes, check_resume_plan, cooldown_tokens, data_sources, log, log_plan, member_config,
                         on_meta, plan_data, print_data_plan, rank, steps_for, train_config, trunk_tokens, world_size,
                         write_report, write_series_json)
from train import TrainConfig, prepare_data, train

MODES = ("grow", "scratch", "fixed_data", "branch")

# -----------------------------------------------------------------------------
# configuration: TrainConfig's fields (train.py), which every stage shares, plus the series' own


@dataclass
class SeriesConfig(TrainConfig):
    # [dict(name=, shape=, lr=[, scratch_lr=, warmup_steps=, moe_experts=, moe_top_k=, activation_checkpointing=]),
    # ...] smallest first; moe_experts > 0 makes the member a mixture of experts (upcycled when grown: grow.py, U),
    # sized and budgeted by its active parameters (6 X_active T); activation_checkpointing overrides the config's
    # for that member's runs (only the largest members need it: budget.py --memory). Checked in plan_series.
    stages: list = field(default_factory=list)
    series_mode: str = "grow+scratch"  # MODES joined by "+" (check() below)
    # scratch tokens per non-embedding parameter (2x Chinchilla, section 3.3)
    tokens_per_param: float = field(default=40.0, metadata=above(0))
    # the growth operators (grow.WIDTHS, grow.DEPTHS): grow.check_growth checks them with the shapes they grow
    grow_width: str = "fpi"
    grow_depth: str = "zero"
    # The growth recipe. The defaults are the best of the first ablation (experiments/ablate.py at CPU demo scale, one seed,
    # 5 tokens per parameter; BENCHMARKS.md): zero-sum noise of
    # 0.3 times each weight's std on the copies (it keeps the function; 1e-3 left them near-identical and training
    # slow to part them) and one schedule over the whole series without re-warmup. There the largest member reaches
    # its scratch twin's final loss on 59% of the FLOPs and ends 6.8% below it, against 93% and 0.8% for the
    # ablation's base (noise 1e-3, fresh AdamW re-warmed up over 20 steps, a cosine per stage: grow_noise=1e-3,
    # grow_schedule="restart", grow_warmup_steps=20). Of that base the paper states bert2BERT's FPI width (section 2.2),
    # and it stacks trained layers upward (grow_depth="stack_top", not "zero"); the noise, the optimizer state, a warmup
    # after growth and a cosine per stage are nanogrow's choices (section 3.5 lists learning rates only). At the paper's
    # 40 tokens per parameter over three seeds (docs/ablation.md) no recipe reaches scratch on 70% of the FLOPs with a
    # finished member, noise 0 is clearly worse, and the rest are within the seeds' spread.
    # symmetry-breaking noise, relative to each weight's std, that keeps the function (grow.py N)
    grow_noise: float = field(default=0.3, metadata=at_least(0))
    grow_warmup_steps: int = field(default=0, metadata=at_least(0, "an integer >= 0"))  # warmup after growth (nanogrow's)
    # "fresh" AdamW after growth, or "grown": AdamW's moments and steps carried through growth (grow.py rule A)
    grow_optimizer: str = field(default="fresh", metadata=one_of(*grow.OPTIMIZERS))
    # "restart": every stage warms up (stage 1: warmup_steps, later ones: grow_warmup_steps) and runs its own
    # schedule to min_lr; "continue": the grown series follows one schedule over its FLOPs, each stage taking its
    # share of the decay (as progressive training grows a model mid-run), so only the last member ends at min_lr;
    # "wsd": a trunk at each stage's stable rate (schedule "constant") on (1 - decay_frac) of the stage's tokens, and at
    # every member a cooldown branch from the trunk's state, decaying linearly to min_lr over decay_frac of the member's
    # scratch tokens T_i, so each finished member has spent FLOPs(X_i, T_i) as its scratch twin (a WSD run cooling down
    # over the same fraction) has; the branches' FLOPs are the series' extra cost (series_flops)
    grow_schedule: str = field(default="continue", metadata=one_of("restart", "continue", "wsd"))
    report: bool = True  # write report.md and series.png when the series is done
    # series_mode "branch": every stage starts from init_from's model (grown into the stage's shape) and trains
    # for this many FLOPs (6 X_active T), reading the data on from where init_from's run stopped
    branch_flops: float = field(default=0.0, metadata=at_least(0))
    # the plan check (plan_data, before any training): the most passes an arm may make over a source's unique tokens.
    # Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models", NeurIPS): up to about 4 epochs, repeated
    # tokens are worth almost as much as new ones; past that their worth falls fast, and a scratch twin that reads
    # fresh data would no longer be a fair baseline
    max_passes: float = field(default=4.0, metadata=above(0))
    # unique tokens each source of `data` holds, one number per source (0: its prepared meta.json in data_dir, else
    # KNOWN_SOURCE_TOKENS): what the plan divides by before the data is downloaded
    data_unique_tokens: list = field(default_factory=list, metadata=rule(
        lambda v: all(isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) and n >= 0 for n in v),
        "finite numbers >= 0, one per source (0: from the prepared data or KNOWN_SOURCE_TOKENS)"))
    plan: bool = False  # print the plan (print_plan: every stage and arm's tokens, passes and FLOPs) and exit: nothing trains

    def check(self):
        """The rules that tie fields together (common.check_config calls this after the field rules)."""
        super().check()  # TrainConfig's, which every stage's run shares
        if not self.stages:
            raise ConfigError("no stages: a series config sets stages = [dict(name=, shape=, lr=), ...]; "
                              "for one model run python train.py CONFIG")
        modes = self.series_mode.split("+")
        if not set(modes) <= set(MODES):
            raise ConfigError(f"series_mode {self.series_mode!r}: use {', '.join(MODES)} joined by '+'")
        require(self.grow_schedule != "wsd" or self.decay_frac < 1, "decay_frac", self.decay_frac,
                "< 1 under grow_schedule 'wsd' (the trunk trains the other 1 - decay_frac)")
        require(len(self.data_unique_tokens) in (0, len(self.data)), "data_unique_tokens", self.data_unique_tokens,
                f"one count per source of data ({len(self.data)}), or empty")
        if "branch" in modes:
            require(modes == ["branch"], "series_mode", self.series_mode, "'branch' alone: branches all start from init_from")
            require(os.path.isfile(self.init_from), "init_from", self.init_from, "an existing checkpoint, the one every "
                    "branch starts from: train that model first (for configs/series_moe_cpu.py, the CPU demo)")
            require(self.branch_flops > 0, "branch_flops", self.branch_flops, "a finite number > 0")


# -----------------------------------------------------------------------------
# the plan: each member's shape, size and token budgets, checked before any training


@dataclass
class Stage:
    index: int  # 0-based position in the series
    name: str
    shape: str  # a named shape (budget.SHAPES)
    config: ModelConfig
    params: int  # X: non-embedding parameters (what FLOPs = 6XT counts)
    lr: float  # peak learning rate of the grown stage (section 3.5: falls with size)
    scratch_lr: float  # the same size trained from scratch (defaults to lr: no tuning advantage either way)
    warmup_after_growth: int  # the stage's warmup_steps, else cfg.grow_warmup_steps
    activation_checkpointing: bool  # for this member's runs (grown, scratch, fixed data)
    scratch_tokens: int  # T_i: the member trained alone
    staged_tokens: int  # what is left of T_i's FLOPs after stages 1..i-1, in tokens of X_i
    repeats_in_fixed_data: bool  # under the fixed-data cap this stage reads tokens a second time


def make_stage(cfg, i, config, params, scratch_tokens, staged_tokens, repeats_in_fixed_data):
    st = cfg.stages[i]
    return Stage(i, st.get("name", st["shape"]), st["shape"], config, params, st["lr"], st.get("scratch_lr", st["lr"]),
                 st.get("warmup_steps", cfg.grow_warmup_steps), st.get("activation_checkpointing", cfg.activation_checkpointing),
                 scratch_tokens, staged_tokens, repeats_in_fixed_data)


def plan_series(cfg, vocab_size=None):
    """(stages, unique-token cap of fixed_data). Raises ConfigError for a series that cannot be grown or
    budgeted, so a mistake fails here, before hours of training. vocab_size: the tokenizer's unless given; 0 counts
    each member with its shape's own (print_plan offline: the non-embedding counts the budget uses do not change)."""
    check_config(cfg)  # again: reproduce.py and ablate.py build their series with dataclasses.replace
    vocab_size = data.get_tokenizer(cfg.tokenizer).vocab_size if vocab_size is None else vocab_size
    configs = [member_config(cfg, i, st, vocab_size) for i, st in enumerate(cfg.stages)]
    with torch.device("meta"):  # count parameters without allocating them; a mixture of experts by its active ones
        sizes = [Llama(c).num_params(non_embedding=True, active=True) for c in configs]
    names = [st.get("name", st["shape"]) for st in cfg.stages]
    modes = cfg.series_mode.split("+")
    if modes == ["branch"]:
        return plan_branches(cfg, configs, sizes), None
    try:
        if {"grow", "fixed_data"} & set(modes):
            for a, b in zip(configs, configs[1:]):
                grow.check_growth(a, b, cfg.grow_width, cfg.grow_depth, cfg.grow_noise, None, cfg.grow_optimizer)
        budgets = budget.staged_budget(sizes, cfg.tokens_per_param, names)
    except ValueError as e:
        raise ConfigError(f"stages: {e}") from None
    cap, data_use = budget.fixed_data(budgets)
    stages = [make_stage(cfg, i, configs[i], sizes[i], b.scratch_tokens, b.staged_tokens, u.repeated > 0)
              for i, (b, u) in enumerate(zip(budgets, data_use))]
    return stages, cap


def plan_branches(cfg, configs, sizes):
    """series_mode "branch": the stages are continuations of one trained model (init_from), each grown from it
    and trained for branch_flops: at equal compute, a model of X active parameters trains branch_flops / 6X
    tokens (Komatsuzaki et al. 2023 compare an upcycled MoE with the dense model continued so)."""
    init = load_checkpoint(cfg.init_from, mmap=True)
    start = checkpoint_config(init)
    try:
        for config in configs:
            grow.check_growth(start, config, cfg.grow_width, cfg.grow_depth, cfg.grow_noise, None, cfg.grow_optimizer)
    except ValueError as e:
        raise ConfigError(f"stages: from init_from {cfg.init_from}: {e}") from None
    if cfg.grow_optimizer == "grown" and not isinstance(init.get("optimizer"), dict):
        raise ConfigError(f"grow_optimizer 'grown': init_from {cfg.init_from} holds no optimizer state to grow: "
                          "use a train.py checkpoint (final.pt), or grow_optimizer='fresh'")
    tokens = [round(cfg.branch_flops / budget.flops(x, 1)) for x in sizes]
    return [make_stage(cfg, i, configs[i], sizes[i], t, t, False) for i, t in enumerate(tokens)]


def print_plan(cfg):
    """--plan: the members (plan_series), then every run's tokens, passes and FLOPs (series_plan.print_data_plan)."""
    try:
        vocab_size, counted = data.get_tokenizer(cfg.tokenizer).vocab_size, ""
    except ConfigError:  # gpt2's BPE files are not on this machine (offline): the plan needs no tokenizer
        vocab_size, counted = 0, f" (tokenizer {cfg.tokenizer} not loaded: the members counted with their shapes' vocabularies)"
    stages, cap = plan_series(cfg, vocab_size)
    print_data_plan(cfg, stages, cap, counted)


# -----------------------------------------------------------------------------
# one member: trained (train.py), or grown from the member before it (grow.py)


def train_member(cfg, runs, mode, stage, tokens, lr, model=None, lineage=None, step_offset=0, unique_cap=0, warmup=None,
                 optimizer_state=None, span=(0.0, 1.0), folder=None, record=True, earlier_flops=0, **run):
    """Train one member for `tokens` tokens in out_dir/MODE/NAME (train.py), record it in series.json, and
    return (its final checkpoint, the data step the next stage starts at). A finished run (final.pt) is kept
    under --resume; a run cut short resumes from its newest checkpoint. model, lineage, optimizer_state: a grown
    member to start from (grow_member); span: the part of the schedule the run covers (common.lr_at); folder:
    out_dir/FOLDER/NAME instead (a wsd trunk's), and record=False keeps it out of series.json (not a finished
    member); earlier_flops: FLOPs of earlier wsd cooldowns, outside this lineage (series_flops); run: other
    TrainConfig fields (schedule, decay_frac; a cooldown branch's init_from)."""
    out_dir = os.path.join(cfg.out_dir, folder or mode, stage.name)
    final = os.path.join(out_dir, "final.pt")
    run_cfg = replace(train_config(cfg), out_dir=out_dir, shape=stage.shape, moe_experts=stage.config.moe_experts,
                      moe_top_k=stage.config.moe_top_k, lr=lr, max_tokens=tokens, max_steps=0,
                      data_step_offset=step_offset, max_unique_tokens=unique_cap,
                      warmup_steps=cfg.warmup_steps if warmup is None else warmup,
                      schedule_start=span[0], schedule_end=span[1], activation_checkpointing=stage.activation_checkpointing, **run)
    schedule = run_cfg.schedule + (f" decay_frac={run_cfg.decay_frac:g}" if run_cfg.schedule == "wsd" else "") + (
        f" over {span[0]:.3f} -> {span[1]:.3f}" if span != (0.0, 1.0) else "") + (" from init_from" if run_cfg.init_from else "")
    if not (cfg.resume and os.path.exists(final)):
        log(f"=== {folder or mode} / {stage.name}: {tokens:,} tokens at lr {lr:g}, schedule {schedule} ===")
        lineage = lineage or Lineage()
        train(run_cfg, model=model, lineage=replace(lineage, stage={"index": stage.index, "name": stage.name, "mode": mode}),
              optimizer_state=optimizer_state)
    # memory-mapped: the ranks of one host share one copy of the file (the 8B's final.pt with its AdamW state is
    # about 100 GB), and growth reads from it
    ckpt = load_checkpoint(final, mmap=True)
    if record:
        runs.append(SeriesRun(mode, stage.name, stage.index, stage.params, ckpt["model_config"], ckpt["tokens"], ckpt["flops"],
                              ckpt["val"]["val_loss"], ckpt["val"]["val_bpb"], os.path.relpath(final, cfg.out_dir),
                              os.path.relpath(os.path.join(out_dir, "metrics.jsonl"), cfg.out_dir), lr, unique_cap or None,
                              finished=run_cfg.schedule != "constant" and span[1] == 1.0, schedule=schedule,
                              series_flops=ckpt["flops"] + earlier_flops))
        if rank() == 0:
            write_series_json(cfg, runs)
    return ckpt, step_offset + steps_for(cfg, tokens)


def grow_member(cfg, ckpt, stage, what):
    """(model, lineage, AdamW state or None) of `stage` grown from checkpoint `ckpt` (grow.grow_checkpoint), on the
    host. Under FSDP the weights and AdamW state reach every rank's shards from rank 0 alone (parallel.py broadcasts
    them as it shards), so rank 0 alone grows; the other ranks get the grown model on the meta device, rank 0's
    lineage and its AdamW state as meta tensors, all that train.py checks there. Else each rank of a node would
    hold a host copy of the largest member (about 34 GB for the 8B, three times that with its AdamW state)."""
    def grow_here():
        grown, gap = grow.grow_checkpoint(ckpt, stage.config, optimizer=cfg.grow_optimizer, width=cfg.grow_width,
                                          depth=cfg.grow_depth, seed=cfg.seed + stage.index, noise=cfg.grow_noise)
        log(f"{what} ({cfg.grow_width}/{cfg.grow_depth}, {cfg.grow_optimizer} optimizer): max |logit gap| {gap:.2e}")
        return grown

    if cfg.parallel != "fsdp" or world_size() == 1:
        grown = grow_here()
        return model_from_checkpoint(grown), Lineage.from_weights(grown), grown.get("optimizer")
    grown = on_rank0_then_share(grow_here, rank(), world_size())  # an error on rank 0 stops every rank
    shared = [(grown["model_config"], Lineage.from_weights(grown), on_meta(grown.get("optimizer"))) if rank() == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    model_config, lineage, optimizer_state = shared[0]
    if rank() == 0:
        return model_from_checkpoint(grown), lineage, grown.get("optimizer")
    with torch.device("meta"):
        return Llama(config_from_dict(model_config)), lineage, optimizer_state


# -----------------------------------------------------------------------------
# the grown series (section 2.2), the scratch baselines (section 3.2), the branches


def train_grown_series(cfg, runs, stages, mode, unique_cap=0):
    """Stage 1 from scratch, then grow and train on what is left of each stage's budget. The stages read
    the data stream on in order: stage i+1 starts where stage i stopped. mode "fixed_data": the same under
    a cap of unique_cap unique tokens (section 3.3). grow_schedule "wsd": each stage is a trunk run at its stable
    rate, then a cooldown branch from it (cooldown); the next stage grows from the trunk."""
    ckpt, offset, cooled = None, 0, 0  # cooled: FLOPs of the wsd cooldown branches so far
    spans = schedule_spans(cfg, stages)
    wsd = cfg.grow_schedule == "wsd"
    for stage in stages:
        tokens = trunk_tokens(cfg, stage)
        if mode == "fixed_data" and "grow" in cfg.series_mode.split("+") and not stage.repeats_in_fixed_data:
            # identical to the grow run up to here (no token is read twice yet): share it
            ckpt = load_checkpoint(os.path.join(cfg.out_dir, "grow_trunk" if wsd else "grow", stage.name, "final.pt"), mmap=True)
            offset += steps_for(cfg, tokens)
            if wsd:
                branch = load_checkpoint(os.path.join(cfg.out_dir, "grow", stage.name, "final.pt"), mmap=True)
                cooled += branch["flops"] - branch["start_flops"]
            continue
        model = lineage = optimizer_state = warmup = None  # stage 1: from scratch, warmup_steps of warmup
        if ckpt is not None:
            # grow the previous stage's final model (and its AdamW state, when grow_optimizer is "grown"):
            # function-preserving where the operator is (grow.py)
            old = ckpt["model_config"]
            model, lineage, optimizer_state = grow_member(cfg, ckpt, stage, f"grew {old['d_model']}x{old['n_layers']} -> "
                                                          f"{stage.config.d_model}x{stage.config.n_layers}")
            # then train at the stage's own learning rate (section 3.5), after grow_warmup_steps of warmup (none in the
            # default recipe), over the stage's span of the schedule
            warmup = stage.warmup_after_growth
        if not wsd:
            ckpt, offset = train_member(cfg, runs, mode, stage, tokens, stage.lr, model=model, lineage=lineage, step_offset=offset,
                                        unique_cap=unique_cap, warmup=warmup, optimizer_state=optimizer_state, span=spans[stage.index])
            continue
        ckpt, offset = train_member(cfg, runs, mode, stage, tokens, stage.lr, model=model, lineage=lineage, step_offset=offset,
                                    unique_cap=unique_cap, warmup=warmup, optimizer_state=optimizer_state, folder=mode + "_trunk",
                                    record=False, schedule="constant")
        cooled += cooldown(cfg, runs, mode, stage, offset, unique_cap, cooled)


def cooldown(cfg, runs, mode, stage, offset, unique_cap, cooled):
    """Finish member `stage` of a wsd trunk (MiniCPM's WSD, Hu et al. 2024, section 4): from the trunk's final state
    (weights and AdamW, train.py's init_from and init_optimizer) decay linearly from the stage's rate to min_lr
    (common.lr_at's "wsd" with decay_frac 1: all of the branch decays), reading the data on from where the trunk
    stopped. The trunk goes on from the state before the cooldown; the branch is the member series.json lists.
    Returns the branch's own FLOPs."""
    trunk = os.path.join(cfg.out_dir, mode + "_trunk", stage.name, "final.pt")
    branch, _ = train_member(cfg, runs, mode, stage, cooldown_tokens(cfg, stage), stage.lr, step_offset=offset,
                             unique_cap=unique_cap, warmup=0, earlier_flops=cooled, schedule="wsd", decay_frac=1.0,
                             init_from=trunk, init_optimizer=True)
    return branch["flops"] - branch["start_flops"]


def schedule_spans(cfg, stages):
    """The part of the learning-rate schedule each stage of a grown series covers: all of it for every stage
    (grow_schedule "restart"), or under "continue" its share of the series' FLOPs (6 X_i T_i of the staged budget),
    so that the stages together run one schedule, as one run of the largest member's FLOPs would. ("wsd" runs whole
    schedules of its own: a constant trunk and the cooldowns.)"""
    if cfg.grow_schedule in ("restart", "wsd"):
        return [(0.0, 1.0)] * len(stages)
    flops = [budget.flops(s.params, s.staged_tokens) for s in stages]
    edges = [sum(flops[:i]) / sum(flops) for i in range(len(stages) + 1)]
    return list(zip(edges, edges[1:]))


def train_scratch_baselines(cfg, runs, stages):
    """Every member trained alone from scratch on its whole budget T_i at its scratch_lr: what the grown
    series is measured against (Table 1). Under grow_schedule "wsd" they are WSD runs that decay over the last
    decay_frac of their tokens, as the grown members' cooldowns do: neither side wins by its schedule."""
    for stage in stages:
        if stage.index == 0 and "grow" in cfg.series_mode.split("+"):
            continue  # the smallest member is trained from scratch in the grown series already
        train_member(cfg, runs, "scratch", stage, stage.scratch_tokens, stage.scratch_lr,
                     **({"schedule": "wsd"} if cfg.grow_schedule == "wsd" else {}))


def train_branches(cfg, runs, stages):
    """series_mode "branch": every stage grows init_from's model into its own shape (the same shape: unchanged;
    moe_experts: upcycled, grow.py U), then trains for branch_flops at its learning rate, all reading the same
    data from where init_from's run stopped."""
    start = load_checkpoint(cfg.init_from, mmap=True)
    offset = (start.get("data_state") or {}).get("step", 0)
    for stage in stages:
        model, lineage, optimizer_state = grow_member(
            cfg, start, stage, f"branch {stage.name}: grew {cfg.init_from} into {stage.shape}"
            + (f" with {stage.config.moe_experts} experts, top-{stage.config.moe_top_k}" if stage.config.moe_experts else ""))
        train_member(cfg, runs, "branch", stage, stage.staged_tokens, stage.lr, model=model, lineage=lineage,
                     step_offset=offset, warmup=stage.warmup_after_growth, optimizer_state=optimizer_state)


# -----------------------------------------------------------------------------
# the whole series: plan, train every mode, report


def run_series(cfg):
    """Run every mode of cfg.series_mode over cfg.stages, then write the report. The series holds its
    out_dir's lock throughout, and a fresh start refuses a folder that holds a series (series.json)
    unless --overwrite; --resume keeps every finished stage and resumes the one that was cut. A plan that reads a
    source more than max_passes times is refused before anything is downloaded or trained (check_passes)."""
    stages, cap = plan_series(cfg)
    sources = data_sources(cfg)
    check_passes(cfg, plan_data(cfg, stages, cap, sources))
    setup_distributed(cfg.device, cfg.dist_timeout)
    lock = on_rank0_then_share(lambda: claim_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite, results=("series.json",),
                                                     logs=("report.md", "series.png")), rank(), world_size())
    try:
        check_resume_plan(cfg)
        if any(s.unique_tokens is None for s in sources):  # no count known before: prepared now (train.py would), checked
            prepare_data(cfg, rank(), world_size(), "cpu")
            check_passes(cfg, plan_data(cfg, stages, cap, data_sources(cfg)))
        log_plan(cfg, stages)
        modes, runs = cfg.series_mode.split("+"), []
        if "branch" in modes:
            train_branches(cfg, runs, stages)
        if "grow" in modes:
            train_grown_series(cfg, runs, stages, "grow")
        if "scratch" in modes:
            train_scratch_baselines(cfg, runs, stages)
        if "fixed_data" in modes:
            train_grown_series(cfg, runs, stages, "fixed_data", unique_cap=cap)
        if rank() == 0 and cfg.report:
            write_report(cfg.out_dir)
    finally:
        if lock is not None:
            lock.release()


# -----------------------------------------------------------------------------


def main(argv):
    with cli_errors():
        cfg = configure(SeriesConfig, argv)
        if cfg.plan:
            print_plan(cfg)  # and exit: nothing trains
        else:
            run_series(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
