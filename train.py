"""
train.py: the plain pretraining loop. It trains one model; series.py runs the staged series on it.

    python train.py configs/tiny_cpu.py                       # one model, on the embedded corpus
    python train.py configs/tiny_cpu.py --lr=3e-3 --resume    # keys override the config; resume exactly
    torchrun --standalone --nproc_per_node=8 train.py configs/paper_1b.py --parallel=fsdp --activation_checkpointing

A config file is plain Python assignments to the fields of TrainConfig; `--key=value` overrides them (a bad key or
value is one error line naming it; a staged series' keys, one line pointing to series.py). Top to bottom: the config,
the data, the model a run starts from, then train(): data, model (over the ranks by parallel.py: DDP or FSDP2,
activation checkpointing, torch.compile), AdamW, and the loop. Every batch is a pure function of (seed, step,
micro-step, rank) (data.BatchLoader) and a checkpoint holds the model, AdamW, the step and every rank's RNG states, so
`--resume` continues bit for bit: on the CPU (tests/test_train.py kills a run and checks), on CUDA with deterministic=true.
"""

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist

import budget
import data
import parallel
from checkpoint import (CheckpointError, Lineage, checkpoint_config, checkpoint_paths, claim_out_dir, latest_checkpoint,
                        load_checkpoint, make_checkpoint, prune_checkpoints, save_checkpoint)
from common import (ConfigError, DivergenceGuard, above, append_jsonl, at_least, autocast_for, check_config, check_device,
                    cli_errors, configure, fmt_time, lr_at, make_optimizer, one_of, peak_flops_for, plot_losses, require,
                    resume_changes, rng_state, rule, set_rng_state, start_metrics, within)
from model import Llama, config_from_dict, config_from_shape

# -----------------------------------------------------------------------------
# configuration: each field's valid values declared beside it (common.check_config), rules across fields in check()

POSITIVE, COUNT, BELOW_1 = above(0, "a positive integer"), at_least(0, "an integer >= 0"), rule(lambda v: 0 <= v < 1, "in [0, 1)")


@dataclass
class TrainConfig:
    # where everything goes: checkpoints, metrics.jsonl, loss.png
    out_dir: str = field(default="out/run", metadata=rule(bool, "a folder path"))
    # model: a named shape (budget.SHAPES), optionally starting from a checkpoint's weights
    shape: str = field(default="tiny", metadata=one_of(*budget.SHAPES))
    init_from: str = ""  # a checkpoint to start from (its weights; a fresh optimizer unless init_optimizer; step 0)
    init_optimizer: bool = False  # with init_from: also its AdamW moments and step counts (grow_cli.py --optimizer grown)
    moe_experts: int = field(default=0, metadata=COUNT)  # a fresh shape as a mixture of this many experts per block (0: dense)
    moe_top_k: int = 2  # experts per token when moe_experts > 0
    # data: sources prepared into data_dir (see data.py); several sources make a mixture by token ratio
    data: list = field(default_factory=lambda: ["default"], metadata=rule(len, "a non-empty list of sources"))  # "default", a path
    data_weights: list = field(default_factory=list, metadata=rule(  # or glob, "hf:ID[:CONFIG]"; token ratios (empty: equal)
        lambda v: all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in v), "finite numbers > 0, one per source"))
    data_names: list = field(default_factory=list)  # labels for per-source validation loss
    text_field: str = "text"
    tokenizer: str = field(default="bytes", metadata=one_of("bytes", "gpt2"))
    data_dir: str = "data_cache"
    max_data_tokens: int = field(default=0, metadata=COUNT)  # cap on tokens prepared per source (0: all)
    max_unique_tokens: int = field(default=0, metadata=COUNT)  # cap on unique tokens read per source: repeats past it (section 3.3)
    data_step_offset: int = field(default=0, metadata=COUNT)  # start the data stream this many steps in (a series' stages read on)
    # batch: tokens per step = batch_size * seq_len * grad_accum * world_size (budget.py plans memory at these defaults)
    batch_size: int = field(default=budget.DEFAULT_BATCH_SIZE, metadata=POSITIVE)
    seq_len: int = field(default=budget.DEFAULT_SEQ_LEN, metadata=POSITIVE)
    grad_accum: int = field(default=budget.DEFAULT_GRAD_ACCUM, metadata=POSITIVE)
    max_steps: int = field(default=1000, metadata=COUNT)
    max_tokens: int = field(default=0, metadata=COUNT)  # if set, max_steps = ceil(max_tokens / tokens per step)
    # optimizer and schedule
    lr: float = field(default=1e-3, metadata=above(0))
    min_lr_ratio: float = field(default=0.1, metadata=within(0, 1))
    warmup_steps: int = field(default=50, metadata=COUNT)
    schedule: str = field(default="cosine", metadata=one_of("cosine", "wsd", "constant"))  # wsd: warmup-stable-decay
    decay_frac: float = field(default=0.2, metadata=rule(lambda v: 0 < v <= 1, "in (0, 1]"))  # wsd: the last fraction decays
    # the part of the schedule this run covers (a series stage under grow_schedule "continue": common.lr_at's span)
    schedule_start: float = 0.0
    schedule_end: float = 1.0
    weight_decay: float = field(default=0.1, metadata=at_least(0))
    decay_embeddings: bool = False
    beta1: float = field(default=0.9, metadata=BELOW_1)
    beta2: float = field(default=0.95, metadata=BELOW_1)
    grad_clip: float = field(default=1.0, metadata=at_least(0, "a finite number >= 0 (0: no clipping)"))
    # system
    device: str = "auto"  # "auto", "cpu", "cuda"
    dtype: str = field(default="auto", metadata=one_of("auto", "float32", "bfloat16"))  # auto: bfloat16 on CUDA, float32 on CPU
    compile: str = field(default="auto", metadata=one_of("auto", "true", "false"))  # auto: on for CUDA
    # under torchrun: "ddp" (every rank holds the whole model) or "fsdp" (FSDP2: weights, gradients and AdamW state
    # sharded over the ranks, for models whose 16 bytes per parameter do not fit one GPU; budget.py --memory)
    parallel: str = field(default="ddp", metadata=one_of("ddp", "fsdp"))
    activation_checkpointing: bool = False  # keep each block's input only and recompute the rest in backward
    deterministic: bool = False  # CUDA: deterministic kernels, so --resume continues bit for bit there too (slower)
    seed: int = field(default=1337, metadata=COUNT)
    # logging, evaluation, checkpoints
    log_interval: int = field(default=10, metadata=POSITIVE)
    eval_interval: int = field(default=100, metadata=POSITIVE)
    eval_batches: int = field(default=20, metadata=POSITIVE)
    ckpt_interval: int = field(default=200, metadata=POSITIVE)
    keep_last: int = field(default=2, metadata=COUNT)  # periodic checkpoints kept (0: all); one goes when that many newer verify
    peak_flops: float = field(default=0.0, metadata=at_least(0))  # per device, for MFU; 0: look up the GPU, measure the CPU
    resume: bool = False  # continue from out_dir's newest good checkpoint (a fresh start if it has none yet)
    overwrite: bool = False  # a fresh run may delete what an earlier run left in out_dir (otherwise refused)
    plot: bool = True
    # divergence: a non-finite loss or gradient norm is never stepped on (common.DivergenceGuard)
    divergence: str = field(default="stop", metadata=one_of("stop", "skip"))  # skip: drop that update, at most max_skips times
    max_skips: int = field(default=10, metadata=COUNT)
    spike_factor: float = field(default=2.0, metadata=rule(lambda v: v == 0 or (math.isfinite(v) and v > 1),  # report a loss
                                                           "0 (off) or a finite number > 1"))  # above this times the running median
    dist_timeout: int = field(default=1800, metadata=POSITIVE)  # seconds a collective may wait for a stuck rank

    def check(self):
        require(self.moe_experts == 0 or 1 <= self.moe_top_k <= self.moe_experts, "moe_top_k", self.moe_top_k, "in [1, moe_experts]")
        require(0 <= self.schedule_start < self.schedule_end <= 1, "schedule_start, schedule_end",
                (self.schedule_start, self.schedule_end), "0 <= start < end <= 1 (the part of the schedule this run covers)")
        require(self.init_from or not self.init_optimizer, "init_optimizer", self.init_optimizer,
                "false without init_from (it takes init_from's optimizer state)")
        if len(self.data_names or self.data) != len(self.data) or len(self.data_weights or self.data) != len(self.data):
            raise ConfigError(f"data has {len(self.data)} sources but data_names has {len(self.data_names)} and data_weights "
                              f"{len(self.data_weights)}")
        check_device(self.device)


# a staged series' keys (series.SeriesConfig's own; tests/test_train.py keeps them in step): series.py's to run, refused here
SERIES_KEYS = ("stages", "series_mode", "tokens_per_param", "grow_width", "grow_depth", "grow_noise", "grow_warmup_steps",
               "grow_optimizer", "grow_schedule", "report", "branch_flops", "max_passes", "data_unique_tokens", "plan")

# -----------------------------------------------------------------------------
# data


def data_dirs(cfg):
    """The folder each source of cfg.data is prepared into: data_dir/NAME-TOKENIZER (series.py's plan reads its meta.json)."""
    return [os.path.join(cfg.data_dir, os.path.basename(data.default_out_dir(src, cfg.tokenizer))) for src in cfg.data]


def prepare_data(cfg, rank, world, device):
    """Prepare every source (rank 0 tokenizes, the others wait): (folders, {name: (fixed validation batches, bytes per token)})."""
    names = cfg.data_names or [f"src{i}" if len(cfg.data) > 1 else "data" for i in range(len(cfg.data))]
    dirs = data_dirs(cfg)
    parallel.on_rank0_then_share(lambda: [data.prepare(src, tokenizer=cfg.tokenizer, out_dir=d, max_tokens=cfg.max_data_tokens or None,
                                                       text_field=cfg.text_field) for src, d in zip(cfg.data, dirs)], rank, world)
    if world > 1:  # every rank must read the splits rank 0 prepared: compared by checksum (none where a node does not share data_dir)
        seen = []
        for d in dirs:
            try:
                seen.append(data.load_prepared(d)[1]["splits"]["train"].get("sha256"))
            except ConfigError:  # missing or incomplete where this rank looks
                seen.append(None)
        parallel.same_on_every_rank(seen, "the prepared data", world)
    splits = [data.load_prepared(d, "val")[1]["splits"]["val"] for d in dirs]
    return dirs, {name: (data.val_batches(d, cfg.batch_size, cfg.seq_len, cfg.eval_batches, device=device),
                         split["bytes"] / split["tokens"]) for name, d, split in zip(names, dirs, splits)}


def evaluate(model, val_sets, cfg, ctx):
    """metrics.jsonl's validation fields: loss (nats/token) and bits per byte of the mixture by token ratio and, of several
    sources, each one's (Weblab-10B's setting, Matsuo Lab 2023: a bilingual mixture watched per language)."""
    results = {}
    for name, (batches, bytes_per_token) in val_sets.items():
        loss = parallel.mean_loss(model, batches, ctx)
        results[name] = (loss, loss / math.log(2) / bytes_per_token)  # bits per byte: tokenizer-independent
    weights = cfg.data_weights or [1.0] * len(results)
    record = {"val_loss": sum(w * r[0] for w, r in zip(weights, results.values())) / sum(weights),
              "val_bpb": sum(w * r[1] for w, r in zip(weights, results.values())) / sum(weights)}
    for name, (loss, bpb) in results.items() if len(results) > 1 else ():
        record[f"val_loss/{name}"], record[f"val_bpb/{name}"] = loss, bpb
    return record


# -----------------------------------------------------------------------------
# the model a run starts from, one optimizer step, the result


def starting_model(cfg, tokenizer, model, lineage, resuming, log, on_meta=False):
    """(model, lineage, path and checkpoint to resume or None), first found of: out_dir's newest checkpoint that verifies
    (resuming; it must hold the model this run would build), the model handed in (a grown series stage), cfg.init_from's
    weights, a fresh cfg.shape. Checkpoints are memory-mapped (one copy per host); on_meta: the model on the meta device,
    its weights checked but not loaded (FSDP ranks other than 0, which receive theirs from rank 0)."""
    tok = {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size}
    resume_path, resume_ckpt = latest_checkpoint(cfg.out_dir, tok, log, mmap=True) if resuming else (None, None)
    init = None
    if model is not None:
        model_config = model.config
    elif cfg.init_from and resume_ckpt is None:
        init = load_checkpoint(cfg.init_from, tokenizer=tok, mmap=True)
        model_config = config_from_dict(init["model_config"])
        lineage = replace(Lineage.from_weights(init), stage=None).then({"op": "init_from", "path": cfg.init_from})
    elif cfg.init_from:  # resuming a run that started from init_from: the run's own record says which
        model_config = config_from_dict(resume_ckpt["model_config"])
        if resume_ckpt.get("train_config", {}).get("init_from") != cfg.init_from:
            raise ConfigError(f"--resume: {resume_path} was not started from init_from={cfg.init_from}: restore the run's "
                              "init_from, or choose a new out_dir")
    else:
        model_config = config_from_shape(cfg.shape, vocab_size=tokenizer.vocab_size, max_seq_len=cfg.seq_len,
                                         moe_experts=cfg.moe_experts, moe_top_k=cfg.moe_top_k)
    if resume_ckpt is not None:
        saved = asdict(checkpoint_config(resume_ckpt))  # a checkpoint from before a field has its default
        differ = sorted(k for k, v in asdict(model_config).items() if saved[k] != v)
        if differ:
            raise ConfigError(f"--resume: {resume_path} holds another model than this run builds ({', '.join(differ)} differ): "
                              "restore the run's shape and settings, or choose a new out_dir")
        lineage = Lineage.to_resume(resume_ckpt)
    if model_config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"the model's vocab_size {model_config.vocab_size} differs from tokenizer {tokenizer.name}'s {tokenizer.vocab_size}")
    if cfg.seq_len > model_config.max_seq_len:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}")
    if model is None:
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            model = Llama(model_config)  # initialized from torch's global RNG, seeded by the caller
    for state in (init, resume_ckpt):
        if state is not None:
            try:  # on the meta device, assign checks names and shapes and copies nothing
                model.load_state_dict(state["model"], assign=on_meta)
            except RuntimeError as e:
                raise CheckpointError(f"{resume_path or cfg.init_from}: its weights do not fit its model_config "
                                      f"({str(e).splitlines()[-1].strip()[:160]})") from None
    return model, lineage, resume_path, resume_ckpt


def forward_backward(model, loader, step, cfg, ctx, device):
    """Forward and backward over grad_accum micro-batches, then clipping: (the mean micro-batch loss, the gradient
    norm before clipping, a mixture of experts' mean load-balancing loss or 0), device tensors: no sync here."""
    loss_sum, aux_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    unwrapped = parallel.unwrap_ddp(model)  # holds aux_loss (model.py)
    for micro in range(cfg.grad_accum):
        x, y = (t.to(device, non_blocking=True) for t in loader.get_batch(cfg.data_step_offset + step, micro))
        with parallel.no_sync_unless_last(model, micro == cfg.grad_accum - 1), ctx:  # DDP syncs on the last, FSDP each
            _, loss = model(x, y)
        (loss / cfg.grad_accum).backward()  # each micro-batch's loss is a mean over its tokens: the step's, over all
        loss_sum += loss.detach()
        if unwrapped.aux_loss is not None:  # a mixture of experts: its loss above includes moe_aux_coef * aux_loss
            aux_sum += unwrapped.aux_loss
    grad_norm = parallel.clip_grad_norm(model, cfg.grad_clip)  # the raw model's own tensors under compile and DDP
    return loss_sum / cfg.grad_accum, grad_norm, aux_sum / cfg.grad_accum


def publish(cfg, last_ckpt, metrics_path, log):
    """out_dir/final.pt, a hard link to the last checkpoint renamed into place (atomic, no copy), and loss.png."""
    final = os.path.join(cfg.out_dir, "final.pt")
    if os.path.exists(final + ".tmp"):
        os.remove(final + ".tmp")
    os.link(last_ckpt or checkpoint_paths(cfg.out_dir)[-1], final + ".tmp")
    os.replace(final + ".tmp", final)
    if cfg.plot:
        plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
    log(f"done: {final}")
    return final


# -----------------------------------------------------------------------------
# one training run


def train(cfg, model=None, lineage=None, log=print, optimizer_state=None):
    """Train one model as cfg says; returns its final checkpoint's path. `model` (a grown series stage) replaces cfg.shape's,
    with its AdamW `optimizer_state` (grow.grow_optimizer_state; unless resuming); `lineage` (checkpoint.Lineage) goes into
    every checkpoint. The run holds out_dir's lock (checkpoint.RunLock) from start to end: one live run per folder."""
    check_config(cfg)
    require(cfg.max_steps > 0 or cfg.max_tokens > 0, "max_steps", cfg.max_steps, "> 0, or set max_tokens: there is nothing to train")
    rank, _, world, device = parallel.setup_distributed(cfg.device, cfg.dist_timeout, cfg.deterministic)
    master = rank == 0
    log = log if master else (lambda *a, **k: None)
    resuming = cfg.resume and bool(checkpoint_paths(cfg.out_dir))  # --resume with nothing saved yet starts fresh
    # one live run per out_dir, never over another run's files; an error on rank 0 stops every rank
    lock = parallel.on_rank0_then_share(lambda: claim_out_dir(cfg.out_dir, resuming, cfg.overwrite), rank, world)
    try:
        # data: the sources prepared, the fixed validation batches, and the training stream (data.BatchLoader: each
        # batch a pure function of seed, step, micro-step and rank)
        torch.manual_seed(cfg.seed)
        ctx, dtype_name = autocast_for(device, cfg.dtype)
        tokenizer = data.get_tokenizer(cfg.tokenizer)
        dirs, val_sets = prepare_data(cfg, rank, world, device)
        loader = data.BatchLoader(dirs, weights=cfg.data_weights or None, split="train", batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                  grad_accum=cfg.grad_accum, rank=rank, world_size=world, seed=cfg.seed,
                                  max_tokens=cfg.max_unique_tokens or None, device=device)  # CUDA: pinned, copied non_blocking

        # the model (fresh, handed in, init_from's or resumed), spread over the ranks: DDP or FSDP (parallel.py)
        fsdp = cfg.parallel == "fsdp" and dist.is_initialized()
        model, lineage, resume_path, resume_ckpt = starting_model(cfg, tokenizer, model, lineage or Lineage(), resuming, log,
                                                                  on_meta=fsdp and rank != 0)
        parallel.same_on_every_rank((resume_path, resume_ckpt and resume_ckpt["step"]), "--resume", world)  # each rank finds its own
        compiled = cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")
        model, raw_model = parallel.parallelize(model, cfg, device, fsdp, compiled)

        # the optimizer, on the parameters it steps (FSDP's shards); a resumed run takes back its AdamW, RNG and guard
        # states, and the same step must mean the same batch
        optimizer = make_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device, cfg.decay_embeddings)
        guard = DivergenceGuard(cfg.divergence, cfg.max_skips, cfg.spike_factor)
        if resume_ckpt is not None:
            changed = [k for k, v in loader.state_dict().items() if resume_ckpt["data_state"].get(k, v) != v]
            if changed:
                raise ConfigError(f"--resume with a different data setup ({', '.join(changed)} changed since the checkpoint): "
                                  "restore those settings, or start a new out_dir")
            parallel.load_optimizer_state(raw_model, optimizer, resume_ckpt["optimizer"], cfg.decay_embeddings, resume_path)
            set_rng_state(resume_ckpt["rng"], rank)
            guard.load_state_dict(resume_ckpt.get("guard", guard.state_dict()))
            note = resume_changes(resume_ckpt.get("train_config", {}), cfg, resume_path)  # a changed --lr: said, and used
            if note:
                log(note)
        elif optimizer_state is not None:  # a grown stage's moments and step counts, with this run's lr, betas, weight decay
            parallel.load_optimizer_state(raw_model, optimizer, optimizer_state, cfg.decay_embeddings, "the grown stage",
                                          own_settings=True)
        elif cfg.init_optimizer:  # init_from's, likewise
            parallel.load_optimizer_state(raw_model, optimizer, load_checkpoint(cfg.init_from, mmap=True).get("optimizer"),
                                          cfg.decay_embeddings, f"init_from {cfg.init_from}", own_settings=True)

        # the budget (max_tokens, when set, decides the number of steps), the FLOPs, MFU's peak, one line saying it all
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
        max_steps = math.ceil(cfg.max_tokens / tokens_per_step) if cfg.max_tokens else cfg.max_steps
        n_params = raw_model.num_params(non_embedding=True, active=True)  # a mixture of experts: 6 X_active T
        flops_at = lambda step: lineage.flops + budget.flops(n_params, step * tokens_per_step)  # the lineage's total
        flops_per_token = raw_model.flops_per_token(cfg.seq_len)  # with attention, for MFU
        # on rank 0 alone, which logs it: a CPU peak measured by every rank at once would be a fraction of it
        peak, peak_how = parallel.on_rank0_then_share(lambda: peak_flops_for(cfg, device, dtype_name), rank, world) or (None, "")
        start_step, val = (resume_ckpt["step"], resume_ckpt["val"]) if resume_ckpt is not None else (0, None)
        metrics_path = start_metrics(cfg.out_dir, start_step if resume_ckpt is not None else None, log) if master else None
        log(f"model {cfg.shape if lineage.stage is None else lineage.stage['name']}: {n_params:,} non-embedding parameters"
            f"{' active per token' if raw_model.config.moe_experts else ''}, {raw_model.num_params(False):,} in all | "
            f"{tokens_per_step:,} tokens/step x {max_steps} steps = {tokens_per_step * max_steps:,} tokens | {device.type} "
            f"{dtype_name}{' compiled' if compiled else ''}{' activation-checkpointed' if cfg.activation_checkpointing else ''}"
            f"{f' {cfg.parallel} x{world} ranks' if world > 1 or fsdp else ''} | MFU peak: "
            f"{f'{peak / 1e12:.2f} TFLOP/s ({peak_how})' if peak else peak_how}{f' | resumed at step {start_step}' if resume_ckpt else ''}")

        # the loop: at each step the evaluation and checkpoint due there, then one optimizer update. tok/s and MFU count the
        # training time alone, not evaluation, checkpoints, or a step that compiled (parallel.TrainingClock)
        model.train()
        last_ckpt, last_good = None, resume_path  # the last checkpoint this run wrote; the one a divergence names
        batches, clock, t_start = parallel.Prefetcher(loader, cfg.grad_accum), parallel.TrainingClock(), time.perf_counter()
        for step in range(start_step, max_steps + 1):
            last = step == max_steps
            # evaluate (every rank its share, rank 0 writes the row): at step 0 (a grown model's inherited loss), on the
            # interval, and at the last step whatever the interval (nanoGPT loses it); a resumed run's first step did already
            if (step > start_step or step == 0) and (step % cfg.eval_interval == 0 or last):
                val = {"step": step, "tokens": step * tokens_per_step, "flops": flops_at(step), **evaluate(model, val_sets, cfg, ctx)}
                if master:
                    append_jsonl(metrics_path, val)
                per_source = "".join(f" | {n} {val[f'val_loss/{n}']:.4f}" for n in val_sets) if len(val_sets) > 1 else ""
                log(f"step {step:>6} | val loss {val['val_loss']:.4f} | val bpb {val['val_bpb']:.4f}{per_source}")
                clock.restart()
            # save out_dir/ckpt_STEP.pt (checkpoint.py's schema, plus what --resume needs), prune the older ones: every rank gathers
            # (FSDP's shards, each rank's CUDA RNG), then rank 0 writes while the others wait outside NCCL (on_rank0_then_share)
            if step > start_step and (step % cfg.ckpt_interval == 0 or last):
                state, adamw, rng = parallel.model_state(raw_model), parallel.optimizer_state(raw_model, optimizer), rng_state(gather=True)
                def save():  # noqa: E306
                    tokens, data_step = step * tokens_per_step, cfg.data_step_offset + step
                    ckpt = make_checkpoint(state, raw_model.config, tokenizer, lineage, run_flops=budget.flops(n_params, tokens),
                                           tokens=tokens, step=step, val=val, train_config=asdict(cfg), optimizer=adamw, rng=rng,
                                           guard=guard.state_dict(),
                                           data_state={**loader.state_dict(), "step": data_step, "epochs": loader.epochs(data_step)})
                    path = os.path.join(cfg.out_dir, f"ckpt_{step:07d}.pt")
                    save_checkpoint(ckpt, path)
                    prune_checkpoints(cfg.out_dir, cfg.keep_last, log)
                    return path
                last_ckpt = last_good = parallel.on_rank0_then_share(save, rank, world)
                del state, adamw
                clock.restart()
            if last:
                break

            # this step's learning rate, then forward and backward over grad_accum micro-batches, and clipping
            lr = lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_frac,
                       (cfg.schedule_start, cfg.schedule_end))
            loss, grad_norm, aux = forward_backward(model, batches, step, cfg, ctx, device)
            done = step + 1

            # the update, never on a non-finite loss or gradient norm (dropped on the device, no wait before it), then the step's
            # one host sync while the GPU runs it (parallel.update); the guard stops the run here, or counts the skip
            train_loss, norm, aux = parallel.update(optimizer, lr, loss, grad_norm, aux)
            clock.tick(tokens_per_step)
            verdict = guard.check(done, train_loss, norm, last_good, log)
            if verdict != "step" and master:
                append_jsonl(metrics_path, {"step": done, "event": verdict, "loss": train_loss, "grad_norm": norm})

            # log: the loss, and the throughput and MFU of the training time since the last line (none: it compiled)
            if done % cfg.log_interval == 0 or done == max_steps or done == 1:
                tok_s, elapsed = clock.tokens_per_second(), time.perf_counter() - t_start
                mfu = flops_per_token * tok_s / (peak * world) if peak and tok_s else None
                epochs = loader.epochs(cfg.data_step_offset + done)
                if master:
                    append_jsonl(metrics_path, {"step": done, "tokens": done * tokens_per_step, "flops": flops_at(done),
                                                "loss": train_loss, "lr": lr, "tok_s": tok_s, "mfu": mfu, "grad_norm": norm,
                                                "epochs": epochs, **({"aux_loss": aux} if raw_model.config.moe_experts else {}),
                                                **({"graphs": clock.graphs_compiled()} if compiled else {})})
                log(f"step {done:>6}/{max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | {f'{tok_s:,.0f}' if tok_s else '-'} tok/s | "
                    f"mfu {f'{100 * mfu:.1f}%' if mfu is not None else 'unknown'} | epoch {max(epochs.values()):.2f} | "
                    f"{fmt_time(elapsed)} elapsed | eta {fmt_time(elapsed / (done - start_step) * (max_steps - done))}")

        # the result: final.pt and the loss curve, by rank 0 while the other ranks wait (a series reads final.pt next)
        return parallel.on_rank0_then_share(lambda: publish(cfg, last_ckpt, metrics_path, log), rank, world)
    finally:
        if lock is not None:
            lock.release()


def main(argv):
    with cli_errors():
        train(configure(TrainConfig, argv, other_keys=SERIES_KEYS, other_command="series.py"))


if __name__ == "__main__":
    main(sys.argv[1:])
