"""
common.py: the run machinery that train.py, series.py and posttrain.py share.

The three errors a user can meet, configuration (plain Python config files plus --key=value, each field's
valid values declared beside it), autocast, AdamW with its weight-decay groups, the learning-rate schedules,
RNG state for exact resume, the peak FLOP/s behind the MFU figure, and metrics.jsonl with its loss plot.
Nothing here knows what is being trained: the loops live in train.py (pretraining) and posttrain.py (SFT,
DPO); the ranks of a torchrun launch are parallel.py's.
"""

import ast
import contextlib
import datetime
import errno
import json
import math
import os
import platform
import random
import runpy
import shlex
import statistics
import sys
import time
import types
from dataclasses import MISSING, asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist

import budget

# -----------------------------------------------------------------------------
# the three errors a user can meet: each ends a command with one line and exit code 2 (cli_errors)


class ConfigError(ValueError):
    """Something the user passed is wrong (a config key, a command-line argument, a data source, a file
    of prompts or results); the message is one line naming it and what to pass instead."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line saying why and what to do."""


class DivergenceError(Exception):
    """Training diverged and the policy says stop; the message names the step and the last good checkpoint."""


# -----------------------------------------------------------------------------
# configuration: config files are plain Python assignments to a dataclass's fields. Each field declares
# its valid values beside it (metadata=above(0), one_of(...)); check_config checks them all in one place.


def type_ok(value, typ):
    """Whether a config value has its field's type: an int is a float too, a bool is neither."""
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
    if typ is float and text.strip().lower() in ("inf", "-inf", "nan", "+inf"):
        return float(text)  # so the range check, not the type check, names what is wrong with it
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if typ is list and not isinstance(value, list):
        value = [value] if not isinstance(value, tuple) else list(value)
    return value


def config_help(config_cls, usage=""):
    """-h/--help of a config-file command: its usage, the opening of its module's docstring (what it does, the
    example commands), then every key of config_cls with its default and its declared rule."""
    module = sys.modules[config_cls.__module__]
    script = os.path.relpath(module.__file__, os.path.dirname(os.path.abspath(__file__)))  # experiments/ablate.py
    usage = usage or f"usage: python {script} [config.py ...] [--key=value ...]"
    lines = [usage, "", *"\n\n".join((module.__doc__ or "").strip().split("\n\n")[:2]).splitlines(), "",
             f"keys, the fields of {config_cls.__name__} (a config file assigns them, --key=value overrides), with defaults:"]
    for f in fields(config_cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        must = f"  ({f.metadata['must']})" if "must" in f.metadata else ""
        lines.append(f"  --{f.name}={default if isinstance(default, str) else repr(default)}  {f.type.__name__}{must}")
    return "\n".join(lines)


def configure(config_cls, argv, other_keys=(), other_command="", usage=""):
    """Fill `config_cls` from config files (plain Python, executed) and --key=value arguments, then check it
    (check_config). Shared by train.py, series.py and posttrain.py. Raises ConfigError naming an unknown key or
    a wrong type; a key in other_keys (another command's: a staged series' given to train.py) names other_command.
    -h or --help prints config_help (with `usage`, if given) and exits 0."""
    if "-h" in argv or "--help" in argv:
        print(config_help(config_cls, usage))
        sys.exit(0)
    known = {f.name: f.type for f in fields(config_cls)}
    values = {}

    def set_key(key, value, where):
        if key in other_keys and key not in known:
            raise ConfigError(f"config key {key!r} in {where} is {other_command}'s, not {config_cls.__name__}'s: "
                              f"run python {other_command} {shlex.join(argv)}")
        if key not in known:
            close = [k for k in known if k.split("_")[0] == key.split("_")[0]][:3]
            raise ConfigError(f"unknown config key {key!r} in {where}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                              + f"; the keys are the fields of {config_cls.__name__} in {sys.modules[config_cls.__module__].__file__}")
        typ = known[key]
        if isinstance(value, tuple) and typ is list:
            value = list(value)
        if not type_ok(value, typ):
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
    return check_config(config_cls(**values))


def require(ok, key, value, must):
    """A range check on a config value: ConfigError naming the key, its value and the valid range."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: must be {must}")


def check_choice(key, value, choices):
    require(value in choices, key, value, "one of " + ", ".join(map(str, choices)))


def rule(ok, must):
    """A field's declared rule: metadata=rule(predicate, "what a valid value is")."""
    return {"ok": ok, "must": must}


def above(low, must=None):
    return rule(lambda v: math.isfinite(v) and v > low, must or f"a finite number > {low}")


def at_least(low, must=None):
    return rule(lambda v: math.isfinite(v) and v >= low, must or f"a finite number >= {low}")


def within(low, high, must=None):
    return rule(lambda v: low <= v <= high, must or f"in [{low}, {high}]")


def one_of(*choices):
    return rule(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def check_config(cfg):
    """Every field against the rule declared beside it, then the config's own `check()` for rules that tie
    fields together: the first bad value raises one ConfigError line naming the key and its valid values."""
    for f in fields(cfg):
        if "ok" in f.metadata:
            value = getattr(cfg, f.name)
            require(f.metadata["ok"](value), f.name, value, f.metadata["must"])
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def check_device(device_pref):
    """--device: one of auto, cpu, cuda; cuda only where torch sees a GPU."""
    check_choice("device", device_pref, ("auto", "cpu", "cuda"))
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no GPU (CPU build, or no driver): use --device=cpu or auto")


@contextlib.contextmanager
def cli_errors(*user_errors):
    """A command's body: a problem the user can fix (ConfigError, DivergenceError, CheckpointError,
    and the caller's own `user_errors`) or a file the system refuses (a read-only folder, a full disk) ends
    it with one `error:` line and exit code 2, never a traceback; the process group is torn down however
    the command ends: after a command that ended well, once every rank is done (gloo can abort a process
    whose peer closed its connections first)."""
    try:
        yield
        if dist.is_initialized():
            dist.barrier()
    except (ConfigError, DivergenceError, CheckpointError, *user_errors) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # the reader of stdout went away (`--help | head`): nobody left to tell; Python's own advice
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the flush at exit would fail again)
        sys.exit(1)
    except OSError as e:
        print(f"error: {e.strerror or e} ({e.filename or 'a file'}): {OS_ERROR_ADVICE.get(e.errno, OS_ERROR_ADVICE[None])}",
              file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:  # a collective that failed under torchrun: gloo and NCCL raise it as a RuntimeError
        line = collective_failure(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# what to do about a file the system refuses, by errno (None: anything else)
OS_ERROR_ADVICE = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space (the disk quota is used up)",
                   errno.EACCES: "choose a path you may write", errno.EPERM: "choose a path you may write",
                   errno.EROFS: "choose a writable path (that filesystem is read-only)",
                   errno.ENOTDIR: "a file stands where a folder is needed: move it, or choose another path",
                   errno.EEXIST: "a file stands where a folder is needed: move it, or choose another path",
                   errno.EISDIR: "a folder stands where a file is needed: move it, or choose another path",
                   None: "free space, or choose a writable path"}


def collective_failure(e):
    """The one line for a collective that failed under torchrun (another rank killed, crashed, or stuck past
    --dist_timeout), or None when `e` is not one. Names this rank, the timeout and --resume."""
    text = str(e)
    if not dist.is_initialized() or not (isinstance(e, dist.DistError) or any(
            s in text for s in ("gloo", "NCCL", "Timed out", "Connection closed by peer", "Connection reset by peer"))):
        return None
    try:  # the timeout the process group was made with (parallel.setup_distributed's --dist_timeout)
        device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
        timeout = f"--dist_timeout={dist.group.WORLD._get_backend(device).options._timeout.total_seconds():g} s"
    except Exception:  # a private attribute: should it move, the line still names the setting
        timeout = "--dist_timeout"
    if "timed out" in text.lower() or "timeout" in text.lower():
        what = f"waited {timeout} in a collective that another rank never joined: it was killed, crashed or is stuck"
    else:
        what = f"lost its connection to another rank in a collective: it was killed or crashed (a stuck one is given up after {timeout})"
    return f"rank {dist.get_rank()} {what}; see that rank's log. The job stops: relaunch it with --resume to continue from the last checkpoint"


# -----------------------------------------------------------------------------
# devices, precision, optimizer, schedule


def use_tf32(device):
    """TF32 tensor cores for float32 matmuls on CUDA (10-bit mantissa products, float32 sums; nanoGPT's setting): the
    float32 paths, evaluation, chat and dtype=float32 runs, at several times float32's speed. bf16 autocast, the
    training default, is unaffected, and so is the CPU. device: "auto", "cpu", "cuda[:i]" or a torch.device."""
    if torch.cuda.is_available() and str(device).split(":")[0] in ("auto", "cuda"):
        torch.set_float32_matmul_precision("high")


def autocast_for(device, dtype_name):
    """bf16 autocast on CUDA (weights stay float32); plain float32 elsewhere."""
    dtype_name = ("bfloat16" if device.type == "cuda" else "float32") if dtype_name == "auto" else dtype_name
    if dtype_name == "float32":
        return contextlib.nullcontext(), "float32"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16), "bfloat16"


def decay_groups(model, decay_embeddings=False):
    """(names with weight decay, names without), in model.named_parameters() order: decay only on matrices
    that are not embeddings (norm gains and embeddings keep theirs, unless decay_embeddings). A tied lm_head
    is the embedding and appears once. AdamW's two groups, and the order old checkpoints stored its state in."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        if not p.requires_grad:
            continue
        is_embedding = name.endswith("embed_tokens.weight")
        (decay if p.dim() >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(name)
    return decay, no_decay


def make_optimizer(model, lr, weight_decay, betas, device, decay_embeddings=False):
    """AdamW with decay_groups' two groups."""
    params = dict(model.named_parameters())
    decay, no_decay = decay_groups(model, decay_embeddings)
    groups = [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    # the fused kernel (the whole update in one pass per tensor) exists for CUDA and, since torch 2.4, the CPU, where
    # nanoGPT's multi-tensor one costs 1% more of the tiny model's step (BENCHMARKS.md). Meta tensors
    # never step and have no fused kernel.
    fused = device.type in ("cuda", "cpu") and all(p.device.type == device.type for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def lr_at(step, max_steps, lr, warmup_steps, schedule="cosine", min_lr_ratio=0.1, decay_frac=0.2, span=(0.0, 1.0)):
    """Learning rate for optimizer step `step` (0-based). Linear warmup over warmup_steps, then cosine
    to lr * min_lr_ratio at the last step, or WSD: constant, then linear decay over the last
    decay_frac of the steps. Progress is clamped to [0, 1] so no edge case (warmup >= max_steps, a
    single step) divides by zero or goes negative.
    span (start, end): the run covers only this part of the schedule, as one stage of a series that follows one
    schedule over all its stages (series.py grow_schedule "continue"): its steps go from `start` to `end` of the
    decay, and its warmup ramps to the value at `start`. (0, 1), the default, is a whole schedule."""
    start, end = span
    min_lr = lr * min_lr_ratio
    if schedule == "constant":
        at = lambda s: lr
    elif schedule == "cosine":
        def at(s):
            progress = min(1.0, max(0.0, (s - warmup_steps) / max(1, max_steps - 1 - warmup_steps)))
            return min_lr + 0.5 * (1 + math.cos(math.pi * (start + (end - start) * progress))) * (lr - min_lr)
    elif schedule == "wsd":
        def at(s):  # in steps of the whole schedule, of which this run is the part [start, end]
            total = max_steps / max(end - start, 1e-12)
            decay_steps = max(1, round(decay_frac * total))
            progress = min(1.0, max(0.0, (start * total + s + 1 - (total - decay_steps)) / decay_steps))  # min_lr at the end
            return lr + (min_lr - lr) * progress
    else:
        raise ConfigError(f"unknown schedule {schedule!r}: use cosine, wsd or constant")
    if step < warmup_steps:
        return at(-1) * (step + 1) / warmup_steps  # up to the value where the span starts (lr for a whole schedule)
    return at(step)


def rng_state(gather=False):
    """Every RNG a run draws from, in plain types (numpy's key array as a list of ints), so a checkpoint
    loads under torch.load(weights_only=True). "cuda": the CUDA generator of each rank's own GPU, in rank order:
    with gather (a collective: every rank calls it) every rank's, otherwise this process's alone."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [torch.cuda.get_rng_state()] if torch.cuda.is_available() else None
    if cuda and gather and dist.is_initialized():
        cuda = [None] * dist.get_world_size()
        dist.all_gather_object(cuda, torch.cuda.get_rng_state())
    return {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached], "python": random.getstate(),
            "cuda": cuda}


def set_rng_state(state, rank=0):
    """rng_state's RNGs back; each rank its own GPU's CUDA generator (a checkpoint from before held one per GPU of rank
    0's process, which every rank restored: indexed by rank the same way)."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda[rank if rank < len(cuda) else 0])


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


def cpu_matmul_peak():
    """(the CPU's float32 matmul peak, where it is cached): measured once per machine (CPU model, torch
    version and thread count) and kept in ~/.cache/nanogrow/cpu_peak.json ($XDG_CACHE_HOME honored), since
    a peak measured at the start of each run is noise on a loaded machine (one here read 0.07 TFLOP/s
    against 0.33 quiet) and every MFU is divided by it. Delete the file to measure again, when quiet."""
    path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanogrow", "cpu_peak.json")
    model_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model_name)
    except OSError:
        pass
    key = f"{model_name} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}  # absent or unreadable: measure
    cache = cache if isinstance(cache, dict) else {}
    peak = cache.get(key, {}).get("flops") if isinstance(cache.get(key), dict) else None
    if isinstance(peak, float) and math.isfinite(peak) and peak > 0:
        return peak, path
    peak = measure_matmul_peak(torch.device("cpu"))
    cache[key] = {"flops": peak, "measured": datetime.datetime.now().isoformat(timespec="seconds")}
    try:  # atomically; a read-only home just means measuring again next time
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.tmp.{os.getpid()}", "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(f"{path}.tmp.{os.getpid()}", path)
    except OSError:
        pass
    return peak, path


def peak_flops_for(cfg, device, dtype_name):
    """(peak FLOP/s per device, how it was found) for the MFU figure; (None, why) when unknown."""
    if cfg.peak_flops > 0:
        return cfg.peak_flops, "configured"
    if device.type == "cpu":
        peak, path = cpu_matmul_peak()
        return peak, f"float32 matmul, measured once: {path}"
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


def finite_or_none(x):
    """JSON has no NaN or inf: a non-finite float is written as null (json.dumps would write bare NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")


def read_jsonl(path, drop_cut_last_line=True):
    """The records of a JSON-lines file, one JSON object a line, blank lines skipped: a run's metrics.jsonl, and
    the data and answer files of posttrain.py and judge.py. A file that cannot be read or is not UTF-8 text (a
    binary given as JSONL), or a line that is not one JSON object, raises one ConfigError naming the file and the
    line. A last line cut short (no newline after it: a kill mid-write of a log, whose lines are ASCII) is dropped
    when drop_cut_last_line; a data file passes False, so that a truncated file is an error, not fewer rows."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or e})") from None
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {raw[e.start:e.start + 1].hex()} at offset {e.start}): "
                          "is it a binary file? pass a JSON-lines text file") from None
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if drop_cut_last_line and i == len(lines) - 1:  # no newline after it: the write was cut off
                break
            raise ConfigError(f"{path} line {i + 1} is not JSON ({e.msg} at column {e.colno}): fix or remove that line "
                              "(one JSON object a line)") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path} line {i + 1} is a JSON {type(row).__name__}, not an object: "
                              "each line must be one row, {\"column\": value, ...}")
        rows.append(row)
    return rows


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



def start_metrics(out_dir, resume_step=None, log=print):
    """Ready out_dir/metrics.jsonl: on resume, drop what the killed run logged after its checkpoint (those
    steps run again, and a line cut short by the kill goes too); on a fresh start, begin it empty (the
    old run's files were claimed by checkpoint.claim_out_dir). A resume that finds no metrics.jsonl says, in one
    line, that the rows before its step are lost (a checkpoint holds the model, not the log). Returns its path."""
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if resume_step and not os.path.exists(metrics_path):
        log(f"warning: --resume at step {resume_step} finds no {metrics_path}: the rows of steps 0 to {resume_step} are "
            f"lost (the checkpoint holds the model, not the log); it starts again with the rows after step {resume_step}")
    kept = [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= resume_step] \
        if resume_step is not None and os.path.exists(metrics_path) else []
    with open(metrics_path + ".tmp", "w") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept)
    os.replace(metrics_path + ".tmp", metrics_path)
    return metrics_path


def resume_changes(saved, config, path, keep=("resume", "overwrite")):
    """One line saying what a --resume does with settings changed since the checkpoint at `path` (saved: the config
    it was written with, as a dict; config: this run's): the steps from the checkpoint on use the new values, those
    already trained keep the old. "" when nothing changed. The keys in `keep` say how to start, not how to train."""
    now = asdict(config)
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k in saved and k not in keep and saved[k] != v]
    return (f"note: --resume with {', '.join(changed)} (changed since {path}): the remaining steps use the new values "
            "(the schedule recomputed from them); the steps already trained keep the old") if changed else ""


# -----------------------------------------------------------------------------
# divergence: never step on, or save, a non-finite loss or gradient


@dataclass
class DivergenceGuard:
    """Checks each step's loss and gradient norm before the optimizer steps on them. A non-finite one is
    never stepped on: policy "stop" ends the run there (its checkpoints stay as they were), policy "skip"
    drops that step's update, up to max_skips times in a run (PaLM, Chowdhery et al. 2022, section 5.1,
    skipped batches around spikes). A loss above spike_factor times the running median of the last
    `window` steps is reported as a spike (0 turns that off). Its state goes into checkpoints, so a
    resumed run counts skips and spikes as the uninterrupted one would."""
    policy: str = "stop"
    max_skips: int = 10
    spike_factor: float = 0.0
    window: int = 50
    skipped: int = 0
    recent: list = field(default_factory=list)

    def check(self, step, loss, grad_norm, last_good, log=print):
        """The verdict on step `step` (1-based): "step" (update), "spike" (update, but the loss jumped) or
        "skip" (drop this update); raises DivergenceError when the policy says stop."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = f"step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}"
            if self.policy == "skip" and self.skipped < self.max_skips:
                self.skipped += 1
                log(f"warning: {what} is not finite: update skipped ({self.skipped} of at most {self.max_skips})")
                return "skip"
            raise DivergenceError(f"{what} is not finite{f' after {self.skipped} skipped updates' if self.skipped else ''}: "
                                  f"stopped before stepping or saving; the last good checkpoint is {last_good or 'none yet'}; "
                                  "lower lr, or set divergence=skip")
        verdict = "step"
        if self.spike_factor > 0 and len(self.recent) >= min(self.window, 10):
            median = statistics.median(self.recent)
            if loss > self.spike_factor * median:
                log(f"warning: step {step}: loss spike {loss:.4f}, {loss / median:.1f}x the running median {median:.4f}")
                verdict = "spike"
        self.recent = (self.recent + [loss])[-self.window:]
        return verdict

    def state_dict(self):
        return {"skipped": self.skipped, "recent": list(self.recent)}

    def load_state_dict(self, state):
        self.skipped, self.recent = state["skipped"], list(state["recent"])

