"""
train.py: the plain pretraining loop. It trains one model; series.py runs the staged series on it.

    python train.py configs/tiny_cpu.py                       # one model, on the embedded corpus
    python train.py configs/tiny_cpu.py --lr=3e-3 --resume    # keys override the config; resume exactly
    torchrun --standalone --nproc_per_node=8 train.py configs/paper_1b.py
    torchrun --standalone --nproc_per_node=8 train.py configs/paper_1b.py --parallel=fsdp --activation_checkpointing

A config file is plain Python assignments to the fields of TrainConfig below; `--key=value` overrides
them. An unknown key or a value of the wrong type is one error line naming it (common.configure).

The loop: AdamW (no weight decay on norms and embeddings), warmup then cosine decay (or WSD),
gradient accumulation and clipping, bf16 autocast on GPU / float32 on CPU, torch.compile (on by
default on CUDA only), and under torchrun DDP or FSDP2 (`parallel`), with optional activation
checkpointing per block. Every step's batch is a pure function of (seed, step,
micro_step, rank) (data.BatchLoader), and a checkpoint holds the model, the optimizer, the step and the
RNG states, so `--resume` continues bit for bit (tests/test_train.py kills a run and checks).
"""

import contextlib
import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel

import budget
import data
from checkpoint import (CheckpointError, Lineage, checkpoint_paths, claim_out_dir, latest_checkpoint, load_checkpoint,
                        make_checkpoint, prune_checkpoints, save_checkpoint)
from common import (ConfigError, DivergenceGuard, append_jsonl, autocast_for, check_choice, check_device, cli_errors, configure,
                    fmt_time, lr_at, make_optimizer, peak_flops_for, plot_losses, rank0_first, require, rng_state, same_on_every_rank,
                    set_rng_state, setup_distributed, start_metrics)
from model import Llama, checkpoint_config, config_from_dict, config_from_shape, rope_cos_sin

# -----------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    # where everything goes: checkpoints, metrics.jsonl, loss.png
    out_dir: str = "out/run"
    # model: a named shape from model.SHAPES, optionally starting from a checkpoint's weights
    shape: str = "tiny"
    init_from: str = ""  # a checkpoint to start from (its weights; a fresh optimizer unless init_optimizer; step 0)
    init_optimizer: bool = False  # with init_from: also its AdamW moments and step counts (grow.py --optimizer grown)
    moe_experts: int = 0  # a fresh shape as a mixture of this many experts per block (model.py; 0: dense)
    moe_top_k: int = 2  # experts per token when moe_experts > 0
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
    # the part of the schedule this run covers (a series stage under grow_schedule "continue": common.lr_at's span)
    schedule_start: float = 0.0
    schedule_end: float = 1.0
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # system
    device: str = "auto"  # "auto", "cpu", "cuda"
    dtype: str = "auto"  # "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16"
    compile: str = "auto"  # "auto" (on for CUDA), "true", "false"
    # under torchrun: "ddp" (every rank holds the whole model) or "fsdp" (FSDP2: weights, gradients and AdamW
    # state sharded over the ranks, for models whose 16 bytes per parameter do not fit one GPU; budget.py --memory)
    parallel: str = "ddp"
    activation_checkpointing: bool = False  # keep each block's input only and recompute the rest in backward
    seed: int = 1337
    # logging, evaluation, checkpoints
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 20
    ckpt_interval: int = 200
    keep_last: int = 2  # periodic checkpoints kept (0: all); a file goes only when that many newer ones verify
    peak_flops: float = 0.0  # per device, for MFU; 0: look up the GPU, measure the CPU
    resume: bool = False  # continue from out_dir's newest good checkpoint (a fresh start if it has none yet)
    overwrite: bool = False  # a fresh run may delete what an earlier run left in out_dir (otherwise refused)
    plot: bool = True
    # divergence: a non-finite loss or gradient norm is never stepped on (common.DivergenceGuard)
    divergence: str = "stop"  # "stop": end the run there; "skip": drop that update, at most max_skips times
    max_skips: int = 10
    spike_factor: float = 2.0  # report a loss above this multiple of the running median (0: off)
    dist_timeout: int = 1800  # seconds a collective may wait for a stuck rank before the job ends


def check_train_config(cfg, needs_budget=True):
    """Every value in range before anything runs: one ConfigError line naming the key and the range.
    needs_budget=False for a series' shared settings (each stage gets its own max_tokens)."""
    for key in ("batch_size", "seq_len", "grad_accum", "log_interval", "eval_interval", "eval_batches", "ckpt_interval",
                "dist_timeout"):
        require(getattr(cfg, key) > 0, key, getattr(cfg, key), "a positive integer")
    for key in ("max_steps", "max_tokens", "max_data_tokens", "max_unique_tokens", "data_step_offset", "warmup_steps",
                "keep_last", "max_skips", "seed", "moe_experts"):
        require(getattr(cfg, key) >= 0, key, getattr(cfg, key), "an integer >= 0")
    require(cfg.moe_experts == 0 or 1 <= cfg.moe_top_k <= cfg.moe_experts, "moe_top_k", cfg.moe_top_k, "in [1, moe_experts]")
    if needs_budget:
        require(cfg.max_steps > 0 or cfg.max_tokens > 0, "max_steps", cfg.max_steps, "> 0, or set max_tokens: there is nothing to train")
    finite = lambda x: math.isfinite(x)
    require(finite(cfg.lr) and cfg.lr > 0, "lr", cfg.lr, "a finite number > 0")
    require(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", cfg.min_lr_ratio, "in [0, 1]")
    require(0 < cfg.decay_frac <= 1, "decay_frac", cfg.decay_frac, "in (0, 1]")
    require(0 <= cfg.schedule_start < cfg.schedule_end <= 1, "schedule_start, schedule_end",
            (cfg.schedule_start, cfg.schedule_end), "0 <= start < end <= 1 (the part of the schedule this run covers)")
    require(cfg.init_from or not cfg.init_optimizer, "init_optimizer", cfg.init_optimizer,
            "false without init_from (it takes init_from's optimizer state)")
    require(finite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "a finite number >= 0")
    require(0 <= cfg.beta1 < 1, "beta1", cfg.beta1, "in [0, 1)")
    require(0 <= cfg.beta2 < 1, "beta2", cfg.beta2, "in [0, 1)")
    require(finite(cfg.grad_clip) and cfg.grad_clip >= 0, "grad_clip", cfg.grad_clip, "a finite number >= 0 (0: no clipping)")
    require(finite(cfg.peak_flops) and cfg.peak_flops >= 0, "peak_flops", cfg.peak_flops, "a finite number >= 0")
    require(cfg.spike_factor == 0 or (finite(cfg.spike_factor) and cfg.spike_factor > 1), "spike_factor", cfg.spike_factor,
            "0 (off) or a finite number > 1")
    check_choice("schedule", cfg.schedule, ("cosine", "wsd", "constant"))
    check_choice("dtype", cfg.dtype, ("auto", "float32", "bfloat16"))
    check_choice("compile", cfg.compile, ("auto", "true", "false"))
    check_choice("tokenizer", cfg.tokenizer, ("bytes", "gpt2"))
    check_choice("divergence", cfg.divergence, ("stop", "skip"))
    check_choice("parallel", cfg.parallel, ("ddp", "fsdp"))
    check_device(cfg.device)
    require(len(cfg.data) > 0, "data", cfg.data, "a non-empty list of sources")
    require(all(isinstance(w, (int, float)) and finite(w) and w > 0 for w in cfg.data_weights), "data_weights", cfg.data_weights,
            "finite numbers > 0, one per source")
    require(bool(cfg.out_dir), "out_dir", cfg.out_dir, "a folder path")


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
        # every rank must read the splits rank 0 prepared: compared by checksum (none where a node does not share data_dir)
        seen = []
        for d in dirs:
            try:
                seen.append(data.load_prepared(d)[1]["splits"]["train"].get("sha256"))
            except data.DataError:  # missing or incomplete where this rank looks
                seen.append(None)
        same_on_every_rank(seen, "the prepared data", world)
    return dirs, names


def validation_sets(cfg, names, dirs, device):
    """{source name: (fixed validation batches, bytes per token)}: the same batches at every evaluation."""
    val_sets = {}
    for name, d in zip(names, dirs):
        batches = data.val_batches(d, cfg.batch_size, cfg.seq_len, cfg.eval_batches, device=device)
        split = data.load_prepared(d, "val")[1]["splits"]["val"]
        val_sets[name] = (batches, split["bytes"] / split["tokens"])
    return val_sets


@torch.no_grad()
def evaluate(model, val_sets, ctx, rank, world):
    """Mean validation loss (nats/token) and bits per byte per source. The fixed validation batches are
    split over the ranks and the sums all-reduced, so every rank takes part (no rank-0-only evaluation
    that would leave the others waiting in a collective). Under FSDP each forward is a collective too (it
    all-gathers the weights): every rank runs as many, and one short of batches repeats its first and
    leaves it out of the sums."""
    model.eval()
    out = {}
    for name, (batches, bytes_per_token) in val_sets.items():
        total = torch.zeros(2, dtype=torch.float64, device=batches[0][0].device if batches else "cpu")
        mine = batches[rank::world]
        rounds = -(-len(batches) // world) if is_fsdp(model) else len(mine)
        for i in range(rounds):
            x, y = mine[i] if i < len(mine) else batches[0]
            with ctx:
                _, loss = model(x, y)
            if i < len(mine):
                total += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64, device=total.device)
        if world > 1:
            dist.all_reduce(total)
        loss = (total[0] / total[1]).item()
        out[name] = (loss, loss / math.log(2) / bytes_per_token)  # bits per byte: tokenizer-independent
    model.train()
    return out


def validation_record(results, cfg, names, step, tokens, flops):
    """One metrics.jsonl row: the mixture's loss weighted by token ratio, and (Weblab-10B's setting, Matsuo
    Lab 2023: a bilingual mixture watched per language) each source's own when there are several."""
    weights = cfg.data_weights or [1.0] * len(names)
    total = sum(weights)
    record = {"step": step, "tokens": tokens, "flops": flops,
              "val_loss": sum(w * results[n][0] for w, n in zip(weights, names)) / total,
              "val_bpb": sum(w * results[n][1] for w, n in zip(weights, names)) / total}
    if len(names) > 1:
        for n in names:
            record[f"val_loss/{n}"], record[f"val_bpb/{n}"] = results[n]
    return record


# -----------------------------------------------------------------------------
# the model a run starts from


def starting_model(cfg, tokenizer, model, lineage, resuming, log, on_meta=False):
    """(model, lineage, path and checkpoint to resume or None). In order of precedence: the newest
    checkpoint in out_dir that verifies (when resuming); the model handed in (a grown series stage);
    cfg.init_from's weights; a fresh cfg.shape. A resumed checkpoint must hold the model this run would
    build (not another shape's, or another run's file): it is refused otherwise. Checkpoints are
    memory-mapped, so ranks on one host share one copy of the file. on_meta: build the model on the meta
    device, its weights checked but not loaded (FSDP ranks other than 0, which receive theirs from rank 0)."""
    tok = {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size}
    resume_path, resume_ckpt = latest_checkpoint(cfg.out_dir, tok, log, mmap=True) if resuming else (None, None)
    init = None
    if model is not None:
        model_config = model.config
    elif cfg.init_from and resume_ckpt is None:
        init = load_checkpoint(cfg.init_from, tokenizer=tok, mmap=True)
        model_config = config_from_dict(init["model_config"])
        lineage = replace(Lineage.after(init), stage=None).then({"op": "init_from", "path": cfg.init_from})
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
        lineage = Lineage.before(resume_ckpt)
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


def training_stream(cfg, dirs, rank, world, resume_ckpt):
    """The training batches (data.BatchLoader). On resume the same step must mean the same batch, so a
    data setup that changed since the checkpoint is refused."""
    loader = data.BatchLoader(dirs, weights=cfg.data_weights or None, split="train", batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                              grad_accum=cfg.grad_accum, rank=rank, world_size=world, seed=cfg.seed,
                              max_tokens=cfg.max_unique_tokens or None)
    if resume_ckpt is not None:
        saved, now = resume_ckpt["data_state"], loader.state_dict()
        changed = [k for k in now if k in saved and saved[k] != now[k]]
        if changed:
            raise ConfigError(f"--resume with a different data setup ({', '.join(changed)} changed since the checkpoint): "
                              "restore those settings, or start a new out_dir")
    return loader


# -----------------------------------------------------------------------------
# the model across ranks: DDP or FSDP2, activation checkpointing
# (FSDP's modules are imported where they are used: they add about a second to the start of every
# process, which a one-process or DDP run never needs)


def is_fsdp(model):
    return hasattr(model, "set_requires_gradient_sync")  # FSDPModule's, without importing it


def checkpoint_blocks(model):
    """Activation checkpointing per block (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
    Cost"): a block keeps only its input for backward and recomputes the rest there, so a run holds every
    block's input plus one block's activations instead of all of them, for about one more forward pass of
    compute. Non-reentrant torch.utils.checkpoint, which works under DDP, FSDP and torch.compile; the
    block's class, parameter names and state dict stay as they are."""
    for block in model.layers:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def shard_model(model, cfg, device, dtype_name, rank, world, use_compile):
    """FSDP2 (torch.distributed.fsdp.fully_shard; Zhao et al. 2023, "PyTorch FSDP"): every rank holds 1/world
    of each parameter, of its gradient and of its AdamW moments, and all-gathers a block's weights just
    before the block runs. The model is built again on the meta device (no memory), each block is sharded
    as its own group (its weights are gathered one block at a time), then the root, whose group holds the
    embedding, the final norm and the lm_head (a tied embedding stays one parameter in one group). Only
    then is it materialized, sharded, and `model`'s weights, which rank 0 alone holds, are broadcast into
    the shards. On CUDA with bf16 the weights are gathered in bf16 and gradients reduced in float32, while
    the sharded weights AdamW steps stay float32 (the master copy)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    config = model.config
    with torch.device("meta"):
        sharded = Llama(config)
    if cfg.activation_checkpointing:
        checkpoint_blocks(sharded)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype_name == "bfloat16"
          else MixedPrecisionPolicy())
    mesh = init_device_mesh(device.type, (world,))
    for block in sharded.layers:
        if use_compile:
            block.compile()  # per block, inside FSDP's hooks (as torchtitan's Llama does)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(sharded, mesh=mesh, mp_policy=mp)
    sharded.to_empty(device=device)
    sharded.rope_cos, sharded.rope_sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.rope_theta, device)
    set_model_state_dict(sharded, model.state_dict() if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return sharded


def parallelize(model, cfg, fsdp, use_compile, rank, world, device, local_rank, dtype_name):
    """(the module the loop calls, the module whose parameters AdamW steps and whose weights are saved).
    DDP (or one process): the model on the device, checkpointed, compiled, DDP-wrapped; the raw model stays
    what is saved (never the wrapper's state dict: nanoGPT issue 325). FSDP: shard_model's, both at once."""
    if fsdp:
        sharded = shard_model(model, cfg, device, dtype_name, rank, world, use_compile)
        return sharded, sharded
    raw_model = model.to(device)
    if cfg.activation_checkpointing:
        checkpoint_blocks(raw_model)
    model = torch.compile(raw_model) if use_compile else raw_model
    if world > 1:
        # gradients as views into DDP's all-reduce buckets: no second copy of them (4 bytes per parameter)
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
    return model, raw_model


def full_state(model, optimizer, fsdp):
    """(model state dict, optimizer state dict) of the whole model on the host, in the layout one process
    saves (optimizer.state_dict(): parameters numbered 0, 1, ... in group order), so a checkpoint reads the
    same whoever wrote it. Under FSDP every rank must call it (it gathers, one tensor at a time); rank 0
    gets the state and the others empty dicts."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state, optim = get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)
    if not state:
        return {}, {}
    if model.config.tie_embeddings:  # gathered as two copies; one tensor, as a single process saves it
        state["lm_head.weight"] = state["embed_tokens.weight"]
    # torch.distributed.checkpoint names each parameter; number them in group order, as torch.optim does
    index = {}
    groups = [{**g, "params": [index.setdefault(name, len(index)) for name in g["params"]]} for g in optim["param_groups"]]
    by_index = {index[name]: s for name, s in optim["state"].items()}
    return state, {"state": dict(sorted(by_index.items())), "param_groups": groups}


def load_optimizer(model, optimizer, state, fsdp, rank):
    """Resume AdamW from a checkpoint's optimizer state (full_state's layout, whoever wrote it). Under FSDP
    rank 0 names the parameters and broadcasts each moment, and every rank keeps its shard."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if rank == 0:
        name_of = {id(p): name for name, p in model.named_parameters()}
        names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
        state = {"state": {names[i]: s for i, s in state["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state if rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def start_optimizer(model, optimizer, state, fsdp, rank, where):
    """Start AdamW from another run's state (a grown stage's, or init_from's with init_optimizer): its moments and
    per-parameter step counts, with this run's settings (each group's lr, betas and weight decay stay this run's).
    ConfigError (one line) for a state that does not fit the model."""
    if not isinstance(state, dict):
        raise ConfigError(f"{where} holds no optimizer state (a checkpoint of train.py, or one grown with grow.py "
                          "--optimizer grown, holds one): drop init_optimizer, or use such a checkpoint")
    entries = state.get("state", {})
    fits = [len(g.get("params", [])) for g in state.get("param_groups", [])] == [len(g["params"]) for g in optimizer.param_groups]
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        e = entries.get(i)
        fits = fits and isinstance(e, dict) and all(isinstance(e.get(k), torch.Tensor) and e[k].shape == p.shape
                                                    for k in ("exp_avg", "exp_avg_sq"))
    if not fits:
        raise ConfigError(f"{where}: its optimizer state does not fit this model (decay_embeddings must match the run "
                          "that wrote it): grow or train that checkpoint again with this model, or start a fresh optimizer")
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    load_optimizer(model, optimizer, state, fsdp, rank)
    for group, mine in zip(optimizer.param_groups, settings):
        group.update(mine)


# -----------------------------------------------------------------------------
# one optimizer step, one checkpoint


def forward_backward(model, loader, step, cfg, ctx, world, device):
    """Forward and backward over grad_accum micro-batches, then clip. Returns the mean micro-batch loss,
    the gradient norm before clipping and the mean load-balancing loss of a mixture of experts (0 for a
    dense model; device tensors: no sync here). The caller steps AdamW."""
    loss_sum, aux_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    core = model.module if isinstance(model, DistributedDataParallel) else model  # holds aux_loss (model.py)
    for micro in range(cfg.grad_accum):
        x, y = loader.get_batch(cfg.data_step_offset + step, micro)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # DDP all-reduces the gradients only on the last micro-step of the step. FSDP reduce-scatters after every
        # micro-step, so each rank only ever holds its shard of the gradients: skipping it (set_requires_gradient_sync)
        # would keep an unsharded float32 gradient on every rank, 4 bytes per parameter, the memory FSDP is for
        # (torchtitan accumulates so too)
        sync = world == 1 or micro == cfg.grad_accum - 1
        with (model.no_sync() if isinstance(model, DistributedDataParallel) and not sync else contextlib.nullcontext()), ctx:
            _, loss = model(x, y)
        # each micro-batch is a mean over its tokens: divide so the step's gradient is the mean over all
        (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach()
        if core.aux_loss is not None:  # a mixture of experts: its loss above includes moe_aux_coef * aux_loss
            aux_sum += core.aux_loss
    # a compiled or DDP-wrapped model's parameters are the raw model's own tensors; with clipping off the
    # norm is still wanted (divergence check, logs): an infinite max_norm scales by exactly 1. Over FSDP's
    # sharded gradients (DTensors) the norm is the whole model's: each rank's sum of squares all-reduced.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor, replicated: the same on every rank, now a plain tensor
        grad_norm = grad_norm.full_tensor()
    return loss_sum / cfg.grad_accum, grad_norm, aux_sum / cfg.grad_accum


def save_train_checkpoint(cfg, model, state, optimizer_state, loader, tokenizer, lineage, step, tokens_per_step, val, guard, log):
    """Write out_dir/ckpt_STEP.pt (checkpoint.py's schema plus what --resume needs) and prune old ones.
    state, optimizer_state: full_state's, on rank 0."""
    n_params = model.num_params(non_embedding=True, active=True)
    tokens = step * tokens_per_step
    data_step = cfg.data_step_offset + step
    ckpt = make_checkpoint(state, model.config, tokenizer, lineage, run_flops=budget.flops(n_params, tokens),
                           tokens=tokens, step=step, val=val, train_config=asdict(cfg), optimizer=optimizer_state,
                           rng=rng_state(), data_state={**loader.state_dict(), "step": data_step, "epochs": loader.epochs(data_step)},
                           guard=guard.state_dict())
    path = os.path.join(cfg.out_dir, f"ckpt_{step:07d}.pt")
    save_checkpoint(ckpt, path)
    prune_checkpoints(cfg.out_dir, cfg.keep_last, log)
    return path


def publish_final(out_dir, last_ckpt):
    """out_dir/final.pt: a hard link to the last checkpoint, renamed into place (atomic, no copy)."""
    final = os.path.join(out_dir, "final.pt")
    tmp = final + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    os.link(last_ckpt or checkpoint_paths(out_dir)[-1], tmp)
    os.replace(tmp, final)
    return final


# -----------------------------------------------------------------------------
# one training run


def train(cfg, model=None, lineage=None, log=print, optimizer_state=None):
    """Train one model as cfg says and return the path of its final checkpoint. `model` (a grown series
    stage) replaces building cfg.shape; `lineage` (checkpoint.Lineage: the series stage, the FLOPs spent
    before, the history) goes into every checkpoint, so a series member carries its whole line;
    `optimizer_state` (a grown stage's AdamW state, grow.grow_optimizer_state) starts AdamW unless resuming.
    The run holds out_dir's lock (checkpoint.RunLock) from start to end: one live run per folder."""
    check_train_config(cfg)
    rank, local_rank, world, device = setup_distributed(cfg.device, cfg.dist_timeout)
    resuming = cfg.resume and bool(checkpoint_paths(cfg.out_dir))  # --resume with nothing saved yet starts fresh

    # one live run per out_dir, never over another run's files; an error on rank 0 stops every rank
    lock = rank0_first(lambda: claim_out_dir(cfg.out_dir, resuming, cfg.overwrite), rank, world)
    try:
        return train_run(cfg, model, lineage or Lineage(), log if rank == 0 else (lambda *a, **k: None), resuming,
                         rank, local_rank, world, device, optimizer_state)
    finally:
        if lock is not None:
            lock.release()


def train_run(cfg, model, lineage, log, resuming, rank, local_rank, world, device, optimizer_state=None):
    """train()'s body, in a claimed out_dir: set up, then the loop."""
    master = rank == 0
    torch.manual_seed(cfg.seed)
    ctx, dtype_name = autocast_for(device, cfg.dtype)
    tokenizer = data.get_tokenizer(cfg.tokenizer)
    dirs, names = prepare_data(cfg, rank, world)

    # the model (fresh, handed in, init_from or resumed), spread over the ranks (DDP or FSDP), AdamW created
    # on the parameters it steps (FSDP's shards), and on resume the optimizer, RNG and guard states
    fsdp = cfg.parallel == "fsdp" and dist.is_initialized()
    model, lineage, resume_path, resume_ckpt = starting_model(cfg, tokenizer, model, lineage, resuming, log,
                                                              on_meta=fsdp and rank != 0)
    same_on_every_rank((resume_path, resume_ckpt and resume_ckpt["step"]), "--resume", world)  # each rank found its own
    use_compile = cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")
    model, raw_model = parallelize(model, cfg, fsdp, use_compile, rank, world, device, local_rank, dtype_name)
    optimizer = make_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device, cfg.decay_embeddings)
    guard = DivergenceGuard(cfg.divergence, cfg.max_skips, cfg.spike_factor)
    if resume_ckpt is not None:
        load_optimizer(raw_model, optimizer, resume_ckpt["optimizer"], fsdp, rank)
        set_rng_state(resume_ckpt["rng"])
        guard.load_state_dict(resume_ckpt.get("guard", guard.state_dict()))
    elif optimizer_state is not None or cfg.init_optimizer:
        where = "the grown stage" if optimizer_state is not None else f"init_from {cfg.init_from}"
        state = optimizer_state if optimizer_state is not None else load_checkpoint(cfg.init_from, mmap=True).get("optimizer")
        start_optimizer(raw_model, optimizer, state, fsdp, rank, where)

    # the data stream and the budget: max_tokens, when set, decides the number of steps
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    max_steps = math.ceil(cfg.max_tokens / tokens_per_step) if cfg.max_tokens else cfg.max_steps
    loader = training_stream(cfg, dirs, rank, world, resume_ckpt)
    val_sets = validation_sets(cfg, names, dirs, device)
    n_params = raw_model.num_params(non_embedding=True, active=True)  # a mixture of experts: 6 X_active T
    flops_at = lambda step: lineage.flops + budget.flops(n_params, step * tokens_per_step)  # the lineage's total
    flops_per_token = raw_model.flops_per_token(cfg.seq_len)  # with attention, for MFU
    # on rank 0 alone, which logs it: a CPU peak measured by every rank at once would be a fraction of it
    peak, peak_how = rank0_first(lambda: peak_flops_for(cfg, device, dtype_name), rank, world) or (None, "")
    start_step = resume_ckpt["step"] if resume_ckpt is not None else 0
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if master:
        start_metrics(cfg.out_dir, start_step if resume_ckpt is not None else None)
    log(f"model {cfg.shape if lineage.stage is None else lineage.stage['name']}: {n_params:,} non-embedding parameters"
        f"{' active per token' if raw_model.config.moe_experts else ''}, "
        f"{raw_model.num_params(False):,} in all | {tokens_per_step:,} tokens/step x {max_steps} steps "
        f"= {tokens_per_step * max_steps:,} tokens | {device.type} {dtype_name}{' compiled' if use_compile else ''}"
        f"{' activation-checkpointed' if cfg.activation_checkpointing else ''}"
        f"{f' {cfg.parallel} x{world} ranks' if world > 1 or fsdp else ''} | MFU peak: " + (f"{peak / 1e12:.2f} TFLOP/s ({peak_how})" if peak else peak_how)
        + (f" | resumed at step {start_step}" if resume_ckpt is not None else ""))

    def validate(step):  # every rank evaluates its share; rank 0 writes the row
        results = evaluate(model.module if isinstance(model, DistributedDataParallel) else model, val_sets, ctx, rank, world)
        record = validation_record(results, cfg, names, step, step * tokens_per_step, flops_at(step))
        if master:
            append_jsonl(metrics_path, record)
        per_source = "".join(f" | {n} {results[n][0]:.4f}" for n in names) if len(names) > 1 else ""
        log(f"step {step:>6} | val loss {record['val_loss']:.4f} | val bpb {record['val_bpb']:.4f}{per_source}")
        return record

    # the loop: one optimizer step per iteration; log, evaluate and save on their intervals
    model.train()
    val = resume_ckpt["val"] if resume_ckpt is not None else None
    last_ckpt = None  # written by this run
    last_good = resume_path  # named when the run stops on divergence
    t_start, t_window, tokens_window = time.perf_counter(), time.perf_counter(), 0
    if start_step == 0 and max_steps > 0:
        val = validate(0)  # the starting point: for a grown model, the loss it inherits
    for step in range(start_step, max_steps):
        # the learning rate of this step, then forward, backward and update
        lr = lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_frac,
                   (cfg.schedule_start, cfg.schedule_end))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm, aux = forward_backward(model, loader, step, cfg, ctx, world, device)
        done, last = step + 1, step + 1 == max_steps
        tokens_window += tokens_per_step

        # never step on a non-finite loss or gradient: one host sync per step buys that guarantee; the
        # gradient norm is the same on every rank (DDP all-reduced the gradients, FSDP the norm), the loss is averaged
        if world > 1:
            losses = torch.stack([loss, aux])  # the load-balancing loss rides along
            dist.all_reduce(losses)
            loss, aux = losses / world
        train_loss, norm = torch.stack([loss, grad_norm.to(loss.dtype)]).tolist()
        verdict = guard.check(done, train_loss, norm, last_good, log)
        if verdict != "skip":
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if verdict != "step" and master:
            append_jsonl(metrics_path, {"step": done, "event": verdict, "loss": train_loss, "grad_norm": norm})

        # log
        if done % cfg.log_interval == 0 or last or done == 1:
            now = time.perf_counter()
            tok_s = tokens_window / (now - t_window)
            mfu = flops_per_token * tok_s / (peak * world) if peak else None
            elapsed = now - t_start
            eta = elapsed / (done - start_step) * (max_steps - done)
            epochs = loader.epochs(cfg.data_step_offset + done)
            if master:
                append_jsonl(metrics_path, {"step": done, "tokens": done * tokens_per_step, "flops": flops_at(done),
                                            "loss": train_loss, "lr": lr, "tok_s": tok_s, "mfu": mfu,
                                            "grad_norm": norm, "epochs": epochs,
                                            **({"aux_loss": aux.item()} if raw_model.config.moe_experts else {})})
            log(f"step {done:>6}/{max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                f"mfu {f'{100 * mfu:.1f}%' if mfu is not None else 'unknown'} | epoch {max(epochs.values()):.2f} | "
                f"{fmt_time(elapsed)} elapsed | eta {fmt_time(eta)}")
            t_window, tokens_window = time.perf_counter(), 0

        # evaluate and save: the last step always does both, whatever the intervals (nanoGPT loses it)
        if done % cfg.eval_interval == 0 or last:
            val = validate(done)
        if done % cfg.ckpt_interval == 0 or last:
            state, optimizer_state = full_state(raw_model, optimizer, fsdp)  # under FSDP every rank gathers
            if master:
                last_ckpt = last_good = save_train_checkpoint(cfg, raw_model, state, optimizer_state, loader, tokenizer,
                                                              lineage, done, tokens_per_step, val, guard, log)
            del state, optimizer_state
            if world > 1:
                dist.barrier()

    # the result: final.pt and the loss curve, by rank 0 while the other ranks wait (a series reads final.pt next)
    def finish():
        final = publish_final(cfg.out_dir, last_ckpt)
        if cfg.plot:
            plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
        log(f"done: {final}")
        return final

    return rank0_first(finish, rank, world)


# -----------------------------------------------------------------------------


def main(argv):
    with cli_errors(data.DataError):
        # a config with `stages` is a staged series, which series.py runs (series.py builds on this file,
        # so it is imported here, not at the top: `python train.py configs/series_cpu.py` keeps working)
        import series
        cfg = configure(series.SeriesConfig, argv)
        if cfg.stages:
            series.run_series(cfg)
        else:
            train(series.train_config(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
