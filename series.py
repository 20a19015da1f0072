"""
series.py: the staged series of Yano et al. 2025 (section 2.2), on top of train.py and grow.py.

    python series.py configs/series_cpu.py                 # the CPU demo: grown and scratch series, the report
    python series.py configs/series_cpu.py --resume        # after a kill: finished stages kept, the cut one resumed
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

A stage with moe_experts > 0 is a mixture of experts (model.SparseMoE), upcycled from the stage before
when grown (grow.py, rule U) and budgeted by its active parameters. series_mode "branch" continues one
trained checkpoint (init_from) several ways at equal compute: every stage is grown from it into its own
shape and trains for branch_flops (configs/series_moe_cpu.py: the demo's largest member, dense vs upcycled).

The file reads in the method's order: the config, the plan (every member's shape and budget, checked before
any training), the record (series.json), training one member, growing one member, the grown series, the
scratch baselines, the branches, and run_series, which runs them all and writes the report.
"""

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.distributed as dist

import budget
import data
import grow
import report
from checkpoint import Lineage, checkpoint_config, claim_out_dir, load_checkpoint, model_from_checkpoint
from common import ConfigError, above, at_least, check_config, cli_errors, configure, one_of, require
from model import Llama, ModelConfig, config_from_dict, config_from_shape
from parallel import on_rank0_then_share, setup_distributed
from train import TrainConfig, train

MODES = ("grow", "scratch", "fixed_data", "branch")
STAGE_KEYS = ("name", "shape", "lr", "scratch_lr", "warmup_steps", "moe_experts", "moe_top_k", "activation_checkpointing")

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
    # scratch tokens per non-embedding parameter (2x Chinchilla, section 3.1)
    tokens_per_param: float = field(default=40.0, metadata=above(0))
    # the growth operators (grow.WIDTHS, grow.DEPTHS): grow.check_growth checks them with the shapes they grow
    grow_width: str = "fpi"
    grow_depth: str = "zero"
    # The growth recipe. The defaults are the best of docs/ablation.md (experiments/ablate.py, CPU demo scale): zero-sum noise of
    # 0.3 times each weight's std on the copies (it keeps the function; 1e-3 left them near-identical and training
    # slow to part them) and one schedule over the whole series without re-warmup. There the largest member reaches
    # its scratch twin's final loss on 59% of the FLOPs and ends 6.8% below it, against 93% and 0.8% for the
    # paper's recipe (noise 1e-3, fresh AdamW re-warmed up over 20 steps, a cosine per stage), which is
    # grow_noise=1e-3, grow_schedule="restart", grow_warmup_steps=20.
    # symmetry-breaking noise, relative to each weight's std, that keeps the function (grow.py N)
    grow_noise: float = field(default=0.3, metadata=at_least(0))
    grow_warmup_steps: int = field(default=0, metadata=at_least(0, "an integer >= 0"))  # warmup after growth (3.5)
    # "fresh" AdamW after growth, or "grown": AdamW's moments and steps carried through growth (grow.py rule A)
    grow_optimizer: str = field(default="fresh", metadata=one_of(*grow.OPTIMIZERS))
    # "restart": every stage warms up (stage 1: warmup_steps, later ones: grow_warmup_steps) and runs its own
    # schedule to min_lr; "continue": the grown series follows one schedule over its FLOPs, each stage taking its
    # share of the decay (as progressive training grows a model mid-run), so only the last member ends at min_lr
    grow_schedule: str = field(default="continue", metadata=one_of("restart", "continue"))
    report: bool = True  # write report.md and series.png when the series is done
    # series_mode "branch": every stage starts from init_from's model (grown into the stage's shape) and trains
    # for this many FLOPs (6 X_active T), reading the data on from where init_from's run stopped
    branch_flops: float = field(default=0.0, metadata=at_least(0))

    def check(self):
        """The rules that tie fields together (common.check_config calls this after the field rules)."""
        super().check()  # TrainConfig's, which every stage's run shares
        if not self.stages:
            raise ConfigError("no stages: a series config sets stages = [dict(name=, shape=, lr=), ...]; "
                              "for one model run python train.py CONFIG")
        modes = self.series_mode.split("+")
        if not set(modes) <= set(MODES):
            raise ConfigError(f"series_mode {self.series_mode!r}: use {', '.join(MODES)} joined by '+'")
        if "branch" in modes:
            require(modes == ["branch"], "series_mode", self.series_mode, "'branch' alone: branches all start from init_from")
            require(os.path.isfile(self.init_from), "init_from", self.init_from, "an existing checkpoint, the one every "
                    "branch starts from: train that model first (for configs/series_moe_cpu.py, the CPU demo)")
            require(self.branch_flops > 0, "branch_flops", self.branch_flops, "a finite number > 0")


def train_config(cfg):
    """The TrainConfig part of a SeriesConfig (what one run of train.py is given)."""
    return TrainConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainConfig)})


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
        return config_from_shape(st["shape"], vocab_size=vocab_size, max_seq_len=cfg.seq_len, **moe)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"stage {i + 1}: shape {st['shape']!r}: {e}") from None


def make_stage(cfg, i, config, params, scratch_tokens, staged_tokens, repeats_in_fixed_data):
    st = cfg.stages[i]
    return Stage(i, st.get("name", st["shape"]), st["shape"], config, params, st["lr"], st.get("scratch_lr", st["lr"]),
                 st.get("warmup_steps", cfg.grow_warmup_steps), st.get("activation_checkpointing", cfg.activation_checkpointing),
                 scratch_tokens, staged_tokens, repeats_in_fixed_data)


def plan_series(cfg):
    """(stages, unique-token cap of fixed_data). Raises ConfigError for a series that cannot be grown or
    budgeted, so a mistake fails here, before hours of training."""
    check_config(cfg)  # again: reproduce.py and ablate.py build their series with dataclasses.replace
    vocab_size = data.get_tokenizer(cfg.tokenizer).vocab_size
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
                grow.check_growth(a, b, cfg.grow_width, cfg.grow_depth, cfg.grow_noise, None)
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
            grow.check_growth(start, config, cfg.grow_width, cfg.grow_depth, cfg.grow_noise, None)
    except ValueError as e:
        raise ConfigError(f"stages: from init_from {cfg.init_from}: {e}") from None
    if cfg.grow_optimizer == "grown" and not isinstance(init.get("optimizer"), dict):
        raise ConfigError(f"grow_optimizer 'grown': init_from {cfg.init_from} holds no optimizer state to grow: "
                          "use a train.py checkpoint (final.pt), or grow_optimizer='fresh'")
    tokens = [round(cfg.branch_flops / budget.flops(x, 1)) for x in sizes]
    return [make_stage(cfg, i, configs[i], sizes[i], t, t, False) for i, t in enumerate(tokens)]


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


def write_series_json(cfg, runs):
    """out_dir/series.json, rewritten atomically after each run (a killed series leaves a whole file)."""
    tokenizer = data.get_tokenizer(cfg.tokenizer)
    path = os.path.join(cfg.out_dir, "series.json")
    record = {"config": asdict(cfg), "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size},
              "runs": [asdict(r) for r in runs]}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# one member: trained (train.py), or grown from the member before it (grow.py)


def train_member(cfg, runs, mode, stage, tokens, lr, model=None, lineage=None, step_offset=0, unique_cap=0, warmup=None,
                 optimizer_state=None, span=(0.0, 1.0)):
    """Train one member for `tokens` tokens in out_dir/MODE/NAME (train.py), record it in series.json, and
    return (its final checkpoint, the data step the next stage starts at). A finished run (final.pt) is kept
    under --resume; a run cut short resumes from its newest checkpoint. model, lineage, optimizer_state: a grown
    member to start from (grow_member); span: the part of the schedule the run covers (common.lr_at)."""
    out_dir = os.path.join(cfg.out_dir, mode, stage.name)
    final = os.path.join(out_dir, "final.pt")
    run_cfg = replace(train_config(cfg), out_dir=out_dir, shape=stage.shape, moe_experts=stage.config.moe_experts,
                      moe_top_k=stage.config.moe_top_k, lr=lr, max_tokens=tokens, max_steps=0,
                      data_step_offset=step_offset, max_unique_tokens=unique_cap,
                      warmup_steps=cfg.warmup_steps if warmup is None else warmup,
                      schedule_start=span[0], schedule_end=span[1], activation_checkpointing=stage.activation_checkpointing)
    if not (cfg.resume and os.path.exists(final)):
        log(f"=== {mode} / {stage.name}: {tokens:,} tokens at lr {lr:g}"
            + (f", schedule {span[0]:.3f} -> {span[1]:.3f}" if span != (0.0, 1.0) else "") + " ===")
        lineage = lineage or Lineage()
        train(run_cfg, model=model, lineage=replace(lineage, stage={"index": stage.index, "name": stage.name, "mode": mode}),
              optimizer_state=optimizer_state)
    # memory-mapped: the ranks of one host share one copy of the file (the 8B's final.pt with its AdamW state is
    # about 100 GB), and growth reads from it
    ckpt = load_checkpoint(final, mmap=True)
    runs.append(SeriesRun(mode, stage.name, stage.index, stage.params, ckpt["model_config"], ckpt["tokens"], ckpt["flops"],
                          ckpt["val"]["val_loss"], ckpt["val"]["val_bpb"], os.path.relpath(final, cfg.out_dir),
                          os.path.relpath(os.path.join(out_dir, "metrics.jsonl"), cfg.out_dir), lr, unique_cap or None))
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


def on_meta(tree):
    """The same nesting of dicts and lists with every tensor on the meta device: its shape, no memory."""
    if isinstance(tree, dict):
        return {k: on_meta(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [on_meta(v) for v in tree]
    return tree.to("meta") if isinstance(tree, torch.Tensor) else tree


# -----------------------------------------------------------------------------
# the grown series (section 2.2), the scratch baselines (section 3.2), the branches


def train_grown_series(cfg, runs, stages, mode, unique_cap=0):
    """Stage 1 from scratch, then grow and train on what is left of each stage's budget. The stages read
    the data stream on in order: stage i+1 starts where stage i stopped. mode "fixed_data": the same under
    a cap of unique_cap unique tokens (section 3.3)."""
    ckpt, offset = None, 0
    spans = schedule_spans(cfg, stages)
    for stage in stages:
        if mode == "fixed_data" and "grow" in cfg.series_mode.split("+") and not stage.repeats_in_fixed_data:
            # identical to the grow run up to here (no token is read twice yet): share it
            ckpt = load_checkpoint(os.path.join(cfg.out_dir, "grow", stage.name, "final.pt"), mmap=True)
            offset += steps_for(cfg, stage.staged_tokens)
            continue
        if ckpt is None:  # stage 1: from scratch
            ckpt, offset = train_member(cfg, runs, mode, stage, stage.staged_tokens, stage.lr, step_offset=offset,
                                        unique_cap=unique_cap, span=spans[stage.index])
            continue
        # grow the previous stage's final model (and its AdamW state, when grow_optimizer is "grown"):
        # function-preserving where the operator is (grow.py)
        old = ckpt["model_config"]
        model, lineage, optimizer_state = grow_member(cfg, ckpt, stage, f"grew {old['d_model']}x{old['n_layers']} -> "
                                                      f"{stage.config.d_model}x{stage.config.n_layers}")
        # then train at the stage's own learning rate (section 3.5), after grow_warmup_steps of warmup (none in the
        # default recipe), over the stage's span of the schedule
        ckpt, offset = train_member(cfg, runs, mode, stage, stage.staged_tokens, stage.lr, model=model, lineage=lineage,
                                    step_offset=offset, unique_cap=unique_cap, warmup=stage.warmup_after_growth,
                                    optimizer_state=optimizer_state, span=spans[stage.index])


def schedule_spans(cfg, stages):
    """The part of the learning-rate schedule each stage of a grown series covers: all of it for every stage
    (grow_schedule "restart"), or under "continue" its share of the series' FLOPs (6 X_i T_i of the staged budget),
    so that the stages together run one schedule, as one run of the largest member's FLOPs would."""
    if cfg.grow_schedule == "restart":
        return [(0.0, 1.0)] * len(stages)
    flops = [budget.flops(s.params, s.staged_tokens) for s in stages]
    edges = [sum(flops[:i]) / sum(flops) for i in range(len(stages) + 1)]
    return list(zip(edges, edges[1:]))


def train_scratch_baselines(cfg, runs, stages):
    """Every member trained alone from scratch on its whole budget T_i at its scratch_lr: what the grown
    series is measured against (Table 1)."""
    for stage in stages:
        if stage.index == 0 and "grow" in cfg.series_mode.split("+"):
            continue  # the smallest member is trained from scratch in the grown series already
        train_member(cfg, runs, "scratch", stage, stage.scratch_tokens, stage.scratch_lr)


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
    unless --overwrite; --resume keeps every finished stage and resumes the one that was cut."""
    stages, cap = plan_series(cfg)
    setup_distributed(cfg.device, cfg.dist_timeout)
    lock = on_rank0_then_share(lambda: claim_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite, results=("series.json",),
                                                     logs=("report.md", "series.png")), rank(), world_size())
    try:
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


def log_plan(cfg, stages):
    """One line: every member's size and token budgets, and what the grown series saves (budget.summarize)."""
    if cfg.series_mode == "branch":
        log(f"{len(stages)} branches from {cfg.init_from}, {cfg.branch_flops:.3g} FLOPs each: "
            + ", ".join(f"{s.name} X_active={s.params:,} {s.staged_tokens:,} tokens" for s in stages))
        return
    summary = budget.summarize(budget.staged_budget([s.params for s in stages], cfg.tokens_per_param, [s.name for s in stages]))
    log(f"series of {len(stages)} stages, modes {cfg.series_mode.split('+')}, {cfg.tokens_per_param:g} tokens per parameter: "
        + ", ".join(f"{s.name} X={s.params:,} scratch {s.scratch_tokens:,} / staged {s.staged_tokens:,} tokens" for s in stages)
        + f" | staged {summary.staged_flops:.3g} FLOPs vs scratch {summary.scratch_flops:.3g} ({summary.saving:.1%} saved)")


def write_report(out_dir):
    """report.md (the paper's Table 1) and series.png (its Figure 2) from series.json."""
    table = report.series_report(out_dir)
    report.plot_series(out_dir, os.path.join(out_dir, "series.png"))
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(table + "\n")
    log(table)
    log(f"report: {os.path.join(out_dir, 'report.md')}, figure: {os.path.join(out_dir, 'series.png')}")


def steps_for(cfg, tokens):
    """Optimizer steps that read `tokens` tokens (the last step whole): where the next stage's data starts."""
    return math.ceil(tokens / (cfg.batch_size * cfg.seq_len * cfg.grad_accum * world_size()))


def rank():
    return int(os.environ.get("RANK", 0))


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))


def log(*args):
    if rank() == 0:
        print(*args)


# -----------------------------------------------------------------------------


def main(argv):
    with cli_errors():
        run_series(configure(SeriesConfig, argv))


if __name__ == "__main__":
    main(sys.argv[1:])
