"""
common.py: the run machinery that train.py, series.py and posttrain.py share.

Configuration (plain Python config files plus --key=value), the distributed setup under torchrun,
autocast, AdamW with its weight-decay groups, the learning-rate schedules, RNG state for exact resume,
the peak FLOP/s behind the MFU figure, and metrics.jsonl with its loss plot. Nothing here knows what
is being trained: the loops live in train.py (pretraining) and posttrain.py (SFT, DPO).
"""

import ast
import contextlib
import json
import math
import os
import random
import runpy
import sys
import time
import types
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist

import budget
from checkpoint import checkpoint_paths

# -----------------------------------------------------------------------------
# configuration: config files are plain Python assignments to a dataclass's fields


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key."""


def _type_ok(value, typ):
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _parse_value(text, typ):
    if typ is str:
        return text
    if typ is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if typ is list and not isinstance(value, list):
        value = [value] if not isinstance(value, tuple) else list(value)
    return value


def configure(config_cls, argv):
    """Fill `config_cls` from config files (plain Python, executed) and --key=value arguments.
    Shared by train.py and posttrain.py. Raises ConfigError naming an unknown key or a wrong type."""
    known = {f.name: f.type for f in fields(config_cls)}
    values = {}

    def set_key(key, value, where):
        if key not in known:
            close = [k for k in known if k.split("_")[0] == key.split("_")[0]][:3]
            raise ConfigError(f"unknown config key {key!r} in {where}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                              + f"; the keys are the fields of {config_cls.__name__} in {sys.modules[config_cls.__module__].__file__}")
        typ = known[key]
        if isinstance(value, tuple) and typ is list:
            value = list(value)
        if not _type_ok(value, typ):
            raise ConfigError(f"config key {key!r} in {where} must be {typ.__name__}, got {type(value).__name__} {value!r}")
        values[key] = float(value) if typ is float else value

    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                if known.get(key) is not bool:
                    raise ConfigError(f"--{key} needs a value: write --{key}=VALUE")
                text = "true"
            set_key(key, _parse_value(text, known.get(key, str)), f"--{key}")
        else:
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg} does not exist")
            try:
                namespace = runpy.run_path(arg)
            except Exception as e:
                raise ConfigError(f"config file {arg} failed to run: {type(e).__name__}: {e}") from None
            for key, value in namespace.items():
                if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                    continue  # imports and helpers inside a config file are not settings
                set_key(key, value, arg)
    return config_cls(**values)



# -----------------------------------------------------------------------------
# devices, precision, optimizer, schedule


def setup_distributed(device_pref="auto"):
    """(rank, local_rank, world_size, device). Under torchrun (RANK set) joins the process group:
    nccl on CUDA, gloo on CPU."""
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    rank, local_rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device_pref, local_rank) if device_pref == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world, device


def autocast_for(device, dtype_name):
    """bf16 autocast on CUDA (weights stay float32); plain float32 elsewhere."""
    dtype_name = ("bfloat16" if device.type == "cuda" else "float32") if dtype_name == "auto" else dtype_name
    if dtype_name == "float32":
        return contextlib.nullcontext(), "float32"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16), "bfloat16"


def make_optimizer(model, lr, weight_decay, betas, device, decay_embeddings=False):
    """AdamW; weight decay only on matrices that are not embeddings (norm gains and embeddings keep
    theirs, unless decay_embeddings). A tied lm_head is the embedding."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = name.endswith("embed_tokens.weight")
        (decay if p.dim() >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def lr_at(step, max_steps, lr, warmup_steps, schedule="cosine", min_lr_ratio=0.1, decay_frac=0.2):
    """Learning rate for optimizer step `step` (0-based). Linear warmup over warmup_steps, then cosine
    to lr * min_lr_ratio at the last step, or WSD: constant, then linear decay over the last
    decay_frac of the steps. Progress is clamped to [0, 1] so no edge case (warmup >= max_steps, a
    single step) divides by zero or goes negative."""
    min_lr = lr * min_lr_ratio
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, max_steps - 1 - warmup_steps)
        progress = min(1.0, max(0.0, progress))
        return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)
    if schedule == "wsd":
        decay_steps = max(1, round(decay_frac * max_steps))
        progress = min(1.0, max(0.0, (step + 1 - (max_steps - decay_steps)) / decay_steps))  # min_lr on the last step
        return lr + (min_lr - lr) * progress
    raise ConfigError(f"unknown schedule {schedule!r}: use cosine, wsd or constant")


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def measure_matmul_peak(device, dtype=torch.float32, n=2048, rounds=5, seconds=0.2):
    """FLOP/s of a large square matmul on this device: the CPU has no datasheet peak to look up, so its
    MFU is measured against what its BLAS actually reaches. The best of a few short rounds, so a
    moment of contention from another process does not lower the peak (and inflate the MFU)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(rounds):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def peak_flops_for(cfg, device, dtype_name):
    """(peak FLOP/s per device, how it was found) for the MFU figure; (None, why) when unknown."""
    if cfg.peak_flops > 0:
        return cfg.peak_flops, "configured"
    if device.type == "cpu":
        return measure_matmul_peak(device), "measured float32 matmul"
    if dtype_name != "bfloat16":
        return None, "unknown for float32 on GPU: set peak_flops"
    name = torch.cuda.get_device_name(device)
    peak = budget.peak_flops(name)
    return (peak, f"bf16 datasheet peak of {name}") if peak else (None, f"unknown GPU {name}: set peak_flops")



# -----------------------------------------------------------------------------
# progress and metrics


def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path, png_path, title=""):
    """Training and validation loss against tokens, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_jsonl(metrics_path)
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title or os.path.dirname(metrics_path))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)



def start_metrics(out_dir, resume_step=None):
    """Ready out_dir/metrics.jsonl: on resume, drop what the killed run logged after its checkpoint (those
    steps run again); on a fresh start, remove the old run's metrics and checkpoints. Returns its path."""
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if resume_step is not None:
        if os.path.exists(metrics_path):
            kept = [r for r in read_jsonl(metrics_path) if r["step"] <= resume_step]
            with open(metrics_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
    else:
        for old in checkpoint_paths(out_dir) + [metrics_path]:
            if os.path.exists(old):
                os.remove(old)
    return metrics_path

