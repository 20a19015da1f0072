"""
bench_gpu.py: training throughput, MFU and peak memory of one shape on GPUs, a row per setting, as a
markdown table for BENCHMARKS.md.

    torchrun --standalone --nproc_per_node=1 bench_gpu.py                                  # paper-1B, context 1024
    torchrun --standalone --nproc_per_node=1 bench_gpu.py --shape paper-2B --parallel fsdp --compile true
    torchrun --standalone --nproc_per_node=8 bench_gpu.py --shape paper-8B --parallel fsdp --activation_checkpointing true
    torchrun --standalone --nproc_per_node=2 bench_gpu.py --device cpu --steps 3 --warmup 1 --compile false  # smoke test

Every setting (--parallel x --compile x --activation_checkpointing, each a comma-separated list) builds
the model afresh and runs train.py's own step (parallel.parallelize, train.forward_backward, AdamW) on
random tokens: the code a run trains with, without data loading or evaluation. A step is grad_accum
micro-batches of batch_size x seq_len tokens per GPU, bf16 on CUDA as train.py runs it, with its one host
sync per step. Timing starts after --warmup steps (which include torch.compile's compilation).
- tokens/s: all GPUs together;
- MFU: model FLOPs per token (6N plus attention, model.flops_per_token) times tokens/s, over the
  GPUs' bf16 dense datasheet peak (budget.peak_flops, looked up once from the device name); on the CPU
  over its float32 matmul peak, measured once per machine and cached (common.cpu_matmul_peak);
- peak memory: torch.cuda.max_memory_allocated over the setting (what tensors held), and
  max_memory_reserved (what the caching allocator took from the GPU: tensors plus its free blocks and
  fragmentation, what must fit), the largest of the ranks (on the CPU, the process's max resident set size so
  far, and no reserved).

On a machine without CUDA it stops with one line unless --device cpu, which runs a tiny shape so the
script can be checked anywhere (tests/test_fsdp.py). A setting that runs out of GPU memory is a row
saying so on one GPU; on several an out-of-memory rank can leave the others waiting until the
collective timeout, so run such settings one at a time.
"""

import argparse
import contextlib
import gc
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one folder up
import budget
import train
from common import ConfigError, autocast_for, cli_errors, cpu_matmul_peak, make_optimizer
from parallel import on_rank0_then_share, parallelize, setup_distributed, update
from model import Llama, config_from_shape


class RandomBatches:
    """The loader interface train.forward_backward reads (get_batch(step, micro)): uniform random token ids,
    a pure function of (step, micro, rank) like data.BatchLoader's batches."""

    def __init__(self, vocab_size, batch_size, seq_len, rank):
        self.shape, self.vocab_size, self.rank = (batch_size, seq_len + 1), vocab_size, rank

    def get_batch(self, step, micro):
        g = torch.Generator().manual_seed((step * 1_000_003 + micro) * 1009 + self.rank)
        tokens = torch.randint(0, self.vocab_size, self.shape, generator=g)
        return tokens[:, :-1], tokens[:, 1:]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(cfg, model_config, steps, warmup, rank, world, device):
    """One setting: (tokens/s over all ranks, peak memory allocated and reserved in bytes; reserved None on the CPU),
    or (None, None, None) if it ran out of memory."""
    fsdp = cfg.parallel == "fsdp"
    ctx, _ = autocast_for(device, cfg.dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = raw = optimizer = None
    try:
        torch.manual_seed(cfg.seed)
        with torch.device("meta") if fsdp and rank != 0 else contextlib.nullcontext():  # as train.starting_model
            model = Llama(model_config)
        model, raw = parallelize(model, cfg, device, fsdp, cfg.compile == "true")
        optimizer = make_optimizer(raw, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
        loader = RandomBatches(model_config.vocab_size, cfg.batch_size, cfg.seq_len, rank)
        for step in range(warmup + steps):
            if step == warmup:
                synchronize(device)
                t0 = time.perf_counter()
            update(optimizer, cfg.lr, *train.forward_backward(model, loader, step, cfg, ctx, device))  # train.py's step and its sync
        synchronize(device)
        seconds = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError:
        return None, None, None
    finally:
        del model, raw, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()  # each setting compiles afresh
    tokens = steps * cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    if device.type == "cuda":
        peak = torch.tensor([float(torch.cuda.max_memory_allocated(device)), float(torch.cuda.max_memory_reserved(device))],
                            device=device)
    else:
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, -1.0])
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    allocated, reserved = peak.tolist()
    return tokens / seconds, allocated, reserved if reserved >= 0 else None


def choices(text, allowed, flag):
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in allowed for v in values):
        raise ConfigError(f"{flag} {text!r}: a comma-separated list of {', '.join(allowed)}")
    return values


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shape", help="a budget.SHAPES name (default paper-1B on CUDA, tiny on the CPU)")
    p.add_argument("--seq_len", type=int, help="context (default 1024 on CUDA, the paper's; 256 on the CPU)")
    p.add_argument("--batch_size", type=int, default=8, help="micro-batch per GPU")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--parallel", default="ddp,fsdp", help="comma-separated: ddp, fsdp")
    p.add_argument("--compile", default="false,true", help="comma-separated: false, true")
    p.add_argument("--activation_checkpointing", default="false,true", help="comma-separated: false, true")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    p.add_argument("--peak_flops", type=float, default=0.0, help="peak FLOP/s per device for MFU (default: looked up)")
    p.error = lambda msg: (print(f"error: {msg}", file=sys.stderr), sys.exit(2))  # one line, not usage + error
    args = p.parse_args(argv)
    with cli_errors():
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("no CUDA device here: bench_gpu.py measures GPUs; --device cpu runs the tiny CPU smoke test")
        for key in ("batch_size", "grad_accum", "steps", "warmup"):
            if getattr(args, key) < (0 if key == "warmup" else 1):
                raise ConfigError(f"--{key} {getattr(args, key)}: must be {'>= 0' if key == 'warmup' else 'a positive integer'}")
        settings = [(par, comp, ac) for par in choices(args.parallel, ("ddp", "fsdp"), "--parallel")
                    for comp in choices(args.compile, ("false", "true"), "--compile")
                    for ac in choices(args.activation_checkpointing, ("false", "true"), "--activation_checkpointing")]
        shape = args.shape or ("paper-1B" if args.device == "cuda" else "tiny")
        seq_len = args.seq_len or (1024 if args.device == "cuda" else 256)
        try:
            model_config = config_from_shape(shape, max_seq_len=seq_len)
        except ValueError as e:
            raise ConfigError(f"--shape: {e}") from None
        rank, _, world, device = setup_distributed(args.device)
        if any(par == "fsdp" for par, _, _ in settings) and not dist.is_initialized():
            raise ConfigError("--parallel fsdp needs a process group, one GPU too: launch with torchrun --standalone "
                              "--nproc_per_node=N bench_gpu.py ...")
        if args.peak_flops > 0:
            peak, how = args.peak_flops, "given"
        elif device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak, how = budget.peak_flops(name), f"bf16 dense datasheet peak of {name}"
        else:  # rank 0 alone prints it: a CPU peak measured by every rank at once would be a fraction of it
            peak, path = on_rank0_then_share(cpu_matmul_peak, rank, world) or (None, "")
            how = f"float32 matmul peak of this CPU, measured once ({path})"
        with torch.device("meta"):
            flops_per_token = Llama(model_config).flops_per_token(seq_len)
        if rank == 0:
            where = f"{world} x {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"CPU, {world} process(es)"
            print(f"# {time.strftime('%Y-%m-%d')}, {where}, torch {torch.__version__}; MFU against "
                  + (f"{peak / 1e12:.3g} TFLOP/s per device ({how})" if peak else f"nothing: unknown peak ({how}), pass --peak_flops")
                  + f"; {shape}: {flops_per_token / 1e9:.3g} GFLOPs per token at context {seq_len}")
            print("| shape | devices | parallel | compile | act. ckpt | tokens per step | tokens/s | tokens/s per device | MFU "
                  f"| peak memory{' (RSS)' if device.type == 'cpu' else ' allocated'} | peak reserved |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
        for parallel, compile_, checkpointing in settings:
            cfg = train.TrainConfig(shape=shape, batch_size=args.batch_size, seq_len=seq_len, grad_accum=args.grad_accum,
                                    device=args.device, compile=compile_, parallel=parallel,
                                    activation_checkpointing=checkpointing == "true")
            tok_s, memory, reserved = bench(cfg, model_config, args.steps, args.warmup, rank, world, device)
            if rank != 0:
                continue
            step_tokens = f"{world} x {args.grad_accum} x {args.batch_size} x {seq_len}"
            head = f"| {shape} | {world} | {parallel} | {'on' if compile_ == 'true' else 'off'} | {'on' if checkpointing == 'true' else 'off'} | {step_tokens} "
            if tok_s is None:
                print(head + "| out of memory | | | | |", flush=True)
                continue
            mfu = f"{100 * flops_per_token * tok_s / (peak * world):.1f}%" if peak else "unknown"
            print(head + f"| {tok_s:,.0f} | {tok_s / world:,.0f} | {mfu} | {memory / 2**30:.2f} GiB | "
                  + (f"{reserved / 2**30:.2f} GiB |" if reserved is not None else "n/a |"), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
