"""
train.py: the plain pretraining loop, and the staged series built on it.

    python train.py configs/tiny_cpu.py                       # one model, on the embedded corpus
    python train.py configs/tiny_cpu.py --lr=3e-3 --resume    # keys override the config; resume exactly
    torchrun --standalone --nproc_per_node=8 train.py configs/paper_1b.py

A config file is plain Python assignments to the fields of TrainConfig below; `--key=value` overrides
them. An unknown key or a value of the wrong type is one error line naming it.

The loop: AdamW (no weight decay on norms and embeddings), warmup then cosine decay (or WSD),
gradient accumulation and clipping, bf16 autocast on GPU / float32 on CPU, torch.compile (on by
default on CUDA only), DDP under torchrun. Every step's batch is a pure function of (seed, step,
micro_step, rank) (data.BatchLoader), and a checkpoint holds the model, the optimizer, the step and the
RNG states, so `--resume` continues bit for bit (tests/test_train.py kills a run and checks).
"""

import ast
import contextlib
import glob
import json
import math
import os
import random
import runpy
import sys
import time
import types
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist

import budget
import data
from checkpoint import CheckpointError, checkpoint_paths, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from common import (ConfigError, append_jsonl, autocast_for, configure, fmt_time, lr_at, make_optimizer, peak_flops_for, plot_losses,
                    rng_state, set_rng_state, setup_distributed, start_metrics)
from model import Llama, config_from_dict, config_from_shape

# -----------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    # where everything goes: checkpoints, metrics.jsonl, loss.png
    out_dir: str = "out/run"
    # model: a named shape from model.SHAPES, optionally starting from a checkpoint's weights
    shape: str = "tiny"
    init_from: str = ""  # a checkpoint to start from (its weights only: fresh optimizer, step 0)
    # data: sources prepared into data_dir (see data.py); several sources make a mixture by token ratio
    data: list = field(default_factory=lambda: ["default"])  # "default", a path or glob, or "hf:ID[:CONFIG]"
    data_weights: list = field(default_factory=list)  # token ratio per source; empty means equal
    data_names: list = field(default_factory=list)  # labels for per-source validation loss
    text_field: str = "text"
    tokenizer: str = "bytes"  # "bytes" or "gpt2"
    data_dir: str = "data_cache"
    max_data_tokens: int = 0  # cap on tokens prepared per source (0: all)
    max_unique_tokens: int = 0  # cap on unique training tokens read per source: repeats past it (section 3.3)
    data_step_offset: int = 0  # start the data stream this many steps in (a series' stages read on in order)
    # batch: tokens per step = batch_size * seq_len * grad_accum * world_size
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    max_steps: int = 1000
    max_tokens: int = 0  # if set, max_steps = ceil(max_tokens / tokens per step)
    # optimizer and schedule
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay) or "constant"
    decay_frac: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # system
    device: str = "auto"  # "auto", "cpu", "cuda"
    dtype: str = "auto"  # "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16"
    compile: str = "auto"  # "auto" (on for CUDA), "true", "false"
    seed: int = 1337
    # logging, evaluation, checkpoints
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 20
    ckpt_interval: int = 200
    keep_last: int = 2  # periodic checkpoints kept (0: all)
    peak_flops: float = 0.0  # per device, for MFU; 0: look up the GPU, measure the CPU
    resume: bool = False
    plot: bool = True
    # the staged series (train_series): non-empty stages switch it on
    stages: list = field(default_factory=list)  # [dict(name=, shape=, lr=), ...] smallest first
    series_mode: str = "grow+scratch"  # "grow", "scratch", "fixed_data", joined by "+"
    tokens_per_param: float = 40.0  # scratch tokens per non-embedding parameter (2x Chinchilla)
    grow_width: str = "fpi"
    grow_depth: str = "zero"
    grow_noise: float = 1e-3
    grow_warmup_steps: int = 20
    report: bool = True



# -----------------------------------------------------------------------------
# data


def prepare_data(cfg, rank, world):
    """Prepare every source (rank 0 tokenizes, the others wait), then return (dirs, names)."""
    names = cfg.data_names or [f"src{i}" if len(cfg.data) > 1 else "data" for i in range(len(cfg.data))]
    if len(names) != len(cfg.data) or (cfg.data_weights and len(cfg.data_weights) != len(cfg.data)):
        raise ConfigError(f"data has {len(cfg.data)} sources but data_names has {len(cfg.data_names)} and data_weights {len(cfg.data_weights)}")
    dirs = [os.path.join(cfg.data_dir, os.path.basename(data.default_out_dir(src, cfg.tokenizer))) for src in cfg.data]
    if rank == 0:
        for src, d in zip(cfg.data, dirs):
            data.prepare(src, tokenizer=cfg.tokenizer, out_dir=d, max_tokens=cfg.max_data_tokens or None, text_field=cfg.text_field)
    if world > 1:
        dist.barrier()
    return dirs, names


@torch.no_grad()
def evaluate(model, val_sets, ctx, rank, world):
    """Mean validation loss (nats/token) and bits per byte per source. The fixed validation batches are
    split over the ranks and the sums all-reduced, so every rank takes part (no rank-0-only evaluation
    that would leave the others waiting in a collective)."""
    model.eval()
    out = {}
    for name, (batches, bytes_per_token) in val_sets.items():
        total = torch.zeros(2, dtype=torch.float64, device=batches[0][0].device if batches else "cpu")
        for x, y in batches[rank::world]:
            with ctx:
                _, loss = model(x, y)
            total += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64, device=total.device)
        if world > 1:
            dist.all_reduce(total)
        loss = (total[0] / total[1]).item()
        out[name] = (loss, loss / math.log(2) / bytes_per_token)  # bits per byte: tokenizer-independent
    model.train()
    return out


# -----------------------------------------------------------------------------
# one training run


def train(cfg, model=None, stage=None, start_flops=0, history=None, log=print):
    """Train one model as cfg says and return the path of its final checkpoint. `model` (e.g. a grown
    one) replaces building cfg.shape; `stage`, `start_flops` and `history` are recorded in every
    checkpoint so that a series member carries its whole lineage."""
    rank, local_rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    log = log if master else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ctx, dtype_name = autocast_for(device, cfg.dtype)
    tokenizer = data.get_tokenizer(cfg.tokenizer)
    dirs, names = prepare_data(cfg, rank, world)

    # --- model, optimizer, and the state to resume ---
    resume_ckpt = None
    if cfg.resume:
        _, resume_ckpt = latest_checkpoint(cfg.out_dir, {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size}, log)
    if resume_ckpt is not None:
        model_config = config_from_dict(resume_ckpt["model_config"])
        stage, start_flops, history = resume_ckpt["stage"], resume_ckpt["start_flops"], resume_ckpt["history"]
    elif model is not None:
        model_config = model.config
    elif cfg.init_from:
        init = load_checkpoint(cfg.init_from, tokenizer={"name": tokenizer.name, "vocab_size": tokenizer.vocab_size})
        model_config, history = config_from_dict(init["model_config"]), init.get("history", []) + [{"op": "init_from", "path": cfg.init_from}]
        start_flops = init.get("flops", 0)
    else:
        model_config = config_from_shape(cfg.shape, vocab_size=tokenizer.vocab_size, max_seq_len=cfg.seq_len)
    if model_config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"the model's vocab_size {model_config.vocab_size} differs from tokenizer {tokenizer.name}'s {tokenizer.vocab_size}")
    if cfg.seq_len > model_config.max_seq_len:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}")
    if model is None:
        model = Llama(model_config)
        if cfg.init_from and resume_ckpt is None:
            model.load_state_dict(init["model"])
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
    model.to(device)
    raw_model = model  # what is saved: never the compiled or DDP-wrapped module (nanoGPT issue 325)
    optimizer = make_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device, cfg.decay_embeddings)
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        set_rng_state(resume_ckpt["rng"])
    use_compile = cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")
    if use_compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)

    # --- data stream and budget ---
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    max_steps = math.ceil(cfg.max_tokens / tokens_per_step) if cfg.max_tokens else cfg.max_steps
    loader = data.BatchLoader(dirs, weights=cfg.data_weights or None, split="train", batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                              grad_accum=cfg.grad_accum, rank=rank, world_size=world, seed=cfg.seed,
                              max_tokens=cfg.max_unique_tokens or None)
    if resume_ckpt is not None:  # the same step must mean the same batch: refuse a changed data setup
        saved, now = resume_ckpt["data_state"], loader.state_dict()
        changed = [k for k in now if k in saved and saved[k] != now[k]]
        if changed:
            raise ConfigError(f"--resume with a different data setup ({', '.join(changed)} changed since the checkpoint): "
                              "restore those settings, or start a new out_dir")
    val_sets = {}
    for name, d in zip(names, dirs):
        batches = data.val_batches(d, cfg.batch_size, cfg.seq_len, cfg.eval_batches, device=device)
        meta = data.load_prepared(d, "val")[1]
        val_sets[name] = (batches, meta["splits"]["val"]["bytes"] / meta["splits"]["val"]["tokens"])
    weights = cfg.data_weights or [1.0] * len(names)
    n_params = raw_model.num_params(non_embedding=True)
    flops_per_token = raw_model.flops_per_token(cfg.seq_len)  # with attention, for MFU
    peak, peak_how = peak_flops_for(cfg, device, dtype_name)
    start_step = resume_ckpt["step"] if resume_ckpt is not None else 0
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if master:
        start_metrics(cfg.out_dir, start_step if resume_ckpt is not None else None)
    log(f"model {cfg.shape if stage is None else stage['name']}: {n_params:,} non-embedding parameters, "
        f"{raw_model.num_params(False):,} in all | {tokens_per_step:,} tokens/step x {max_steps} steps "
        f"= {tokens_per_step * max_steps:,} tokens | {device.type} {dtype_name}{' compiled' if use_compile else ''}"
        f"{f' x{world} ranks' if world > 1 else ''} | MFU peak: " + (f"{peak / 1e12:.2f} TFLOP/s ({peak_how})" if peak else peak_how)
        + (f" | resumed at step {start_step}" if resume_ckpt is not None else ""))

    def save(step, val):
        ckpt = {"model": raw_model.state_dict(), "model_config": asdict(raw_model.config), "train_config": asdict(cfg),
                "optimizer": optimizer.state_dict(), "step": step, "tokens": step * tokens_per_step,
                "start_flops": start_flops, "flops": start_flops + 6 * n_params * step * tokens_per_step,
                "stage": stage, "data_state": {**loader.state_dict(), "step": cfg.data_step_offset + step,
                               "epochs": loader.epochs(cfg.data_step_offset + step)},
                "rng": rng_state(), "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size},
                "history": history or [], "val": val}
        path = os.path.join(cfg.out_dir, f"ckpt_{step:07d}.pt")
        save_checkpoint(ckpt, path)
        prune_checkpoints(cfg.out_dir, cfg.keep_last)
        return path

    def validate(step):
        results = evaluate(model if world == 1 else model.module, val_sets, ctx, rank, world)
        total_w = sum(weights)
        record = {"step": step, "tokens": step * tokens_per_step, "flops": start_flops + 6 * n_params * step * tokens_per_step,
                  "val_loss": sum(w * results[n][0] for w, n in zip(weights, names)) / total_w,
                  "val_bpb": sum(w * results[n][1] for w, n in zip(weights, names)) / total_w}
        if len(names) > 1:  # the Weblab-10B setting: each language's loss on its own
            for n in names:
                record[f"val_loss/{n}"], record[f"val_bpb/{n}"] = results[n]
        if master:
            append_jsonl(metrics_path, record)
        per_source = "".join(f" | {n} {results[n][0]:.4f}" for n in names) if len(names) > 1 else ""
        log(f"step {step:>6} | val loss {record['val_loss']:.4f} | val bpb {record['val_bpb']:.4f}{per_source}")
        return record

    # --- the loop ---
    model.train()
    val = resume_ckpt["val"] if resume_ckpt is not None else None
    last_ckpt = None
    t_start, t_window, tokens_window = time.perf_counter(), time.perf_counter(), 0
    if start_step == 0 and max_steps > 0:
        val = validate(0)
    for step in range(start_step, max_steps):
        lr = lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = loader.get_batch(cfg.data_step_offset + step, micro)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = world == 1 or micro == cfg.grad_accum - 1  # DDP all-reduces only on the last micro-step
            with (contextlib.nullcontext() if sync else model.no_sync()), ctx:
                _, loss = model(x, y)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        tokens_window += tokens_per_step
        last = done == max_steps
        if done % cfg.log_interval == 0 or last or done == 1:
            train_loss = loss_sum / cfg.grad_accum
            if world > 1:
                dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
            train_loss = train_loss.item()  # the one device sync per log line
            now = time.perf_counter()
            tok_s = tokens_window / (now - t_window)
            mfu = flops_per_token * tok_s / (peak * world) if peak else None
            elapsed = now - t_start
            eta = elapsed / (done - start_step) * (max_steps - done)
            record = {"step": done, "tokens": done * tokens_per_step, "flops": start_flops + 6 * n_params * done * tokens_per_step,
                      "loss": train_loss, "lr": lr, "tok_s": tok_s, "mfu": mfu,
                      "grad_norm": grad_norm.item() if grad_norm is not None else None,
                      "epochs": loader.epochs(cfg.data_step_offset + done)}
            if master:
                append_jsonl(metrics_path, record)
            epochs = max(loader.epochs(cfg.data_step_offset + done).values())
            log(f"step {done:>6}/{max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                f"mfu {f'{100 * mfu:.1f}%' if mfu is not None else 'unknown'} | epoch {epochs:.2f} | "
                f"{fmt_time(elapsed)} elapsed | eta {fmt_time(eta)}")
            t_window, tokens_window = time.perf_counter(), 0
        # the last step always evaluates and saves, whatever the intervals (nanoGPT loses it)
        if done % cfg.eval_interval == 0 or last:
            val = validate(done)
        if done % cfg.ckpt_interval == 0 or last:
            if master:
                last_ckpt = save(done, val)
            if world > 1:
                dist.barrier()
    if master and max_steps > 0:
        final = os.path.join(cfg.out_dir, "final.pt")
        tmp = final + ".tmp"  # a hard link to the last checkpoint, renamed into place: atomic, no copy
        if os.path.exists(tmp):
            os.remove(tmp)
        os.link(last_ckpt or checkpoint_paths(cfg.out_dir)[-1], tmp)
        os.replace(tmp, final)
        if cfg.plot:
            plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
        log(f"done: {final}")
        return final
    return None


# -----------------------------------------------------------------------------
# the staged series (section 2.2): train stage 1, grow, train stage 2 on what is left of its budget, ...


def series_plan(cfg):
    """One dict per stage: name, model config, X (non-embedding parameters), learning rates, and the
    token counts budget.staged_budget gives for X at cfg.tokens_per_param."""
    tokenizer = data.get_tokenizer(cfg.tokenizer)
    plan = []
    for i, st in enumerate(cfg.stages):
        unknown = set(st) - {"name", "shape", "lr", "scratch_lr", "warmup_steps"}
        if unknown or "shape" not in st or "lr" not in st:
            raise ConfigError(f"stage {i + 1} {st}: a stage is dict(name=, shape=, lr=[, scratch_lr=, warmup_steps=])"
                              + (f"; unknown keys {sorted(unknown)}" if unknown else ""))
        model_config = config_from_shape(st["shape"], vocab_size=tokenizer.vocab_size, max_seq_len=cfg.seq_len)
        with torch.device("meta"):  # count parameters without allocating them
            X = Llama(model_config).num_params(non_embedding=True)
        plan.append(dict(index=i, name=st.get("name", st["shape"]), shape=st["shape"], config=model_config, params=X, lr=st["lr"],
                         scratch_lr=st.get("scratch_lr", st["lr"]), warmup_steps=st.get("warmup_steps")))
    try:  # a series that cannot be grown or budgeted fails here, before hours of training
        if {"grow", "fixed_data"} & set(cfg.series_mode.split("+")):
            import grow as growth
            for a, b in zip(plan, plan[1:]):
                growth.check_growth(a["config"], b["config"], cfg.grow_width, cfg.grow_depth, cfg.grow_noise, None)
        budgets = budget.staged_budget([p["params"] for p in plan], cfg.tokens_per_param, [p["name"] for p in plan])
    except ValueError as e:
        raise ConfigError(f"stages: {e}") from None
    cap, data_use = budget.fixed_data(budgets)
    for p, b, u in zip(plan, budgets, data_use):
        p.update(scratch_tokens=b.scratch_tokens, staged_tokens=b.staged_tokens, repeats_in_fixed_data=u.repeated > 0)
    return plan, cap


def train_series(cfg):
    """Run the modes of cfg.series_mode over cfg.stages and write RUN_DIR/series.json (and the report).
    grow: stage 1 from scratch, then grow.grow + train on the rest of each stage's budget.
    scratch: every size alone on its own scratch budget (stage 1 is shared with grow: it is the same run).
    fixed_data: as grow, but unique training tokens are capped at the largest scratch run's count, so
    the later stages repeat data (section 3.3); stages that read no repeats are shared with grow.
    With --resume a finished run (final.pt) is kept and an interrupted one resumes exactly."""
    import grow as growth  # grow.py: the expansion operators
    from dataclasses import replace
    rank = int(os.environ.get("RANK", 0))
    modes = cfg.series_mode.split("+")
    if not set(modes) <= {"grow", "scratch", "fixed_data"}:
        raise ConfigError(f"series_mode {cfg.series_mode!r}: use grow, scratch, fixed_data joined by '+'")
    plan, cap = series_plan(cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", 1))
    log = print if rank == 0 else (lambda *a, **k: None)
    sm = budget.summarize(budget.staged_budget([p["params"] for p in plan], cfg.tokens_per_param, [p["name"] for p in plan]))
    log(f"series of {len(plan)} stages, modes {modes}, {cfg.tokens_per_param:g} tokens per parameter: "
        + ", ".join(f"{p['name']} X={p['params']:,} scratch {p['scratch_tokens']:,} / staged {p['staged_tokens']:,} tokens" for p in plan)
        + f" | staged {sm.staged_flops:.3g} FLOPs vs scratch {sm.scratch_flops:.3g} ({sm.saving:.1%} saved)")
    runs = []

    def run_stage(mode, p, tokens, lr, model=None, start_flops=0, history=None, step_offset=0, unique_cap=0, warmup=None):
        out_dir = os.path.join(cfg.out_dir, mode, p["name"])
        final = os.path.join(out_dir, "final.pt")
        stage_cfg = replace(cfg, out_dir=out_dir, shape=p["shape"], lr=lr, max_tokens=tokens, max_steps=0, stages=[],
                            data_step_offset=step_offset, max_unique_tokens=unique_cap,
                            warmup_steps=cfg.warmup_steps if warmup is None else warmup,
                            resume=cfg.resume and bool(checkpoint_paths(out_dir)))
        if not (cfg.resume and os.path.exists(final)):
            log(f"=== {mode} / {p['name']}: {tokens:,} tokens at lr {lr:g} ===")
            train(stage_cfg, model=model, stage={"index": p["index"], "name": p["name"], "mode": mode},
                  start_flops=start_flops, history=history)
        ckpt = load_checkpoint(final)
        steps = math.ceil(tokens / tokens_per_step)
        runs.append({"mode": mode, "stage": p["name"], "index": p["index"], "params": p["params"],
                     "model_config": ckpt["model_config"], "tokens": ckpt["tokens"], "flops": ckpt["flops"],
                     "val_loss": ckpt["val"]["val_loss"], "val_bpb": ckpt["val"]["val_bpb"],
                     "ckpt": os.path.relpath(final, cfg.out_dir), "metrics": os.path.relpath(os.path.join(out_dir, "metrics.jsonl"), cfg.out_dir),
                     "lr": lr, "unique_token_cap": unique_cap or None})
        write_series_json(cfg, runs)
        return ckpt, step_offset + steps

    def grown_series(mode, unique_cap=0):
        ckpt, offset = None, 0
        for p in plan:
            if mode == "fixed_data" and "grow" in modes and not p["repeats_in_fixed_data"]:
                # identical to the grow run up to here (no token is read twice yet): share it
                ckpt = load_checkpoint(os.path.join(cfg.out_dir, "grow", p["name"], "final.pt"))
                offset += math.ceil(p["staged_tokens"] / tokens_per_step)
                continue
            if ckpt is None:  # stage 1: from scratch
                ckpt, offset = run_stage(mode, p, p["staged_tokens"], p["lr"], step_offset=offset, unique_cap=unique_cap)
                continue
            # grow the previous stage's final model: function-preserving where the operator is (grow.py)
            grown, gap = growth.grow_checkpoint(ckpt, p["config"], width=cfg.grow_width, depth=cfg.grow_depth,
                                                seed=cfg.seed + p["index"], noise=cfg.grow_noise)
            log(f"grew {ckpt['model_config']['d_model']}x{ckpt['model_config']['n_layers']} -> "
                f"{p['config'].d_model}x{p['config'].n_layers} ({cfg.grow_width}/{cfg.grow_depth}): max |logit gap| {gap:.2e}")
            model = Llama(config_from_dict(grown["model_config"]))
            model.load_state_dict(grown["model"])
            # after growth: fresh AdamW state, a short warmup, the stage's own learning rate
            warmup = p["warmup_steps"] if p["warmup_steps"] is not None else cfg.grow_warmup_steps
            ckpt, offset = run_stage(mode, p, p["staged_tokens"], p["lr"], model=model, start_flops=grown["flops"],
                                     history=grown["history"], step_offset=offset, unique_cap=unique_cap, warmup=warmup)

    if "grow" in modes:
        grown_series("grow")
    if "scratch" in modes:
        for p in plan:
            if p["index"] == 0 and "grow" in modes:
                continue  # the smallest member is trained from scratch in the grown series already
            run_stage("scratch", p, p["scratch_tokens"], p["scratch_lr"])
    if "fixed_data" in modes:
        grown_series("fixed_data", unique_cap=cap)
    if rank == 0 and cfg.report:
        import report  # report.py: the series report (Table 1 and Figure 2 of the paper)
        table = report.series_report(cfg.out_dir)
        report.plot_series(cfg.out_dir, os.path.join(cfg.out_dir, "series.png"))
        with open(os.path.join(cfg.out_dir, "report.md"), "w") as f:
            f.write(table + "\n")
        log(table)
        log(f"report: {os.path.join(cfg.out_dir, 'report.md')}, figure: {os.path.join(cfg.out_dir, 'series.png')}")


def write_series_json(cfg, runs):
    if int(os.environ.get("RANK", 0)) != 0:
        return
    tokenizer = data.get_tokenizer(cfg.tokenizer)
    path = os.path.join(cfg.out_dir, "series.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"config": asdict(cfg), "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size},
                   "runs": runs}, f, indent=1)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------


def main(argv):
    try:
        cfg = configure(TrainConfig, argv)
        if cfg.stages:
            train_series(cfg)
        else:
            train(cfg)
    except (ConfigError, CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
