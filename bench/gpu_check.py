"""
gpu_check.py: the first thing to run on a GPU, in one command: is the GPU path right, and how fast is it?

    python bench/gpu_check.py                     # one GPU, under 8 minutes: out/gpu_check/gpu_check.json and .md
    python bench/gpu_check.py --device cpu        # the same parts at toy sizes (tests/test_series.py runs it)

Each part is a child process of this script (under torchrun for the distributed ones) with a time box of its own,
inside one budget for the whole check (--budget_s); a part that fails, runs out of memory or overruns is a row
saying so, and the next part runs. In order:

  environment  python, torch, CUDA, cuDNN, NCCL, the device, its memory and driver, the bf16 peak MFU is taken against
  compile      tiny, one process, compiled: 8 training steps and an evaluation under torch._dynamo's counters (graphs
               traced, graph breaks, recompile-limit hits): no break, no hit, no graph traced after the first step
  resume       tiny for 60 steps with a checkpoint at 30, then that checkpoint resumed (--resume) to 60 in another
               folder: the loss falls, and the resumed losses equal the first run's within RESUME_TOLERANCE
  fsdp         tiny under torchrun, one rank: FSDP2, activation checkpointing and compile: the loss falls, and
               dynamo traced graphs (issue 23's point 2: none were), with no break and no recompile-limit hit
  ddp_1b       paper-1B at context 1024 in bf16, DDP (one rank) + compile; fsdp_1b: FSDP + compile + activation
               checkpointing. train.py's own step on random tokens (bench_gpu.bench): tokens/s, MFU against the
               device's bf16 datasheet peak (the bar: 45% for ddp_1b), peak memory allocated and reserved, each
               against budget.py --memory's estimate of the same setting
  series       a grown series of three stages (cpu-1 -> cpu-2 -> cpu-3) in one process, compiled: every stage
               finishes with no graph break and no recompile-limit hit (issue 23's point 3)

On the CPU (--device cpu) the parts run at toy sizes, and torch.compile traces with dynamo's "eager" backend: the
graphs, breaks and recompiles are dynamo's and the same on every device, while inductor's code generation would take
minutes on two cores. Those numbers check that the script runs, nothing else.
"""

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one folder up
import bench_gpu
import budget
import parallel
import series
import train
from common import ConfigError, autocast_for, cli_errors, cpu_matmul_peak, make_optimizer, read_jsonl
from model import Llama, config_from_shape

# (name, time box in seconds, under torchrun): a box is cut to what is left of --budget_s
PARTS = [("environment", 60, False), ("compile", 120, False), ("resume", 150, False), ("fsdp", 120, True),
         ("ddp_1b", 150, True), ("fsdp_1b", 150, True), ("series", 180, False)]
# the sizes each part runs at, on a GPU and at toy scale on the CPU
SIZES = {
    "cuda": dict(batch_size=16, seq_len=256, big_shape="paper-1B", big_batch=8, big_seq=1024, steps=15, warmup=3, series_tpp=2.0),
    "cpu": dict(batch_size=4, seq_len=64, big_shape="tiny", big_batch=2, big_seq=64, steps=2, warmup=1, series_tpp=0.05),
}
# README: "--resume continues bit for bit" (on CUDA with deterministic=true, which the resume part sets): the resumed
# losses must equal the first run's exactly
RESUME_TOLERANCE = 0.0
MFU_BAR = 0.45  # issue 23: paper-1B, bf16, compiled, context 1024, one H100 (MPT-1B reports 42%)


# -----------------------------------------------------------------------------
# what dynamo did over a stretch of code


class DynamoWatch(logging.Handler):
    """torch._dynamo's counters over a `with` block: graphs traced, graph breaks, and recompile-limit hits (dynamo's
    warning "torch._dynamo hit config.recompile_limit": without fullgraph the function then runs eagerly; with it,
    as parallel.py compiles, the call raises and the part fails)."""

    def __enter__(self):
        self.hits = 0
        self.start = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
        logging.getLogger("torch._dynamo").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("torch._dynamo").removeHandler(self)

    def emit(self, record):
        if "recompile_limit" in record.getMessage() and "hit config." in record.getMessage():
            self.hits += 1

    def counts(self):
        return {"graphs": counters["stats"]["unique_graphs"] - self.start[0],
                "graph_breaks": sum(counters["graph_break"].values()) - self.start[1], "recompile_limit_hits": self.hits}


def use_eager_backend():
    """--backend eager: every torch.compile of the project (parallel.compile_settings) traces with dynamo's "eager"
    backend, which runs the traced graphs as they are instead of generating code for them."""
    settings = parallel.compile_settings
    parallel.compile_settings = lambda backend="inductor": settings("eager")


def losses(metrics_path):
    return {r["step"]: r["loss"] for r in read_jsonl(metrics_path) if "loss" in r}


def loss_falls(by_step):
    steps = sorted(by_step)
    first, last = [by_step[s] for s in steps[:5]], [by_step[s] for s in steps[-5:]]
    return sum(last) / len(last) < sum(first) / len(first), first[0], last[-1]


def run_config(args, out_dir, **overrides):
    """A TrainConfig of tiny on the embedded corpus at this device's small sizes."""
    size = SIZES[args.device]
    return train.TrainConfig(out_dir=out_dir, shape="tiny", data=["default"], data_dir=args.data_dir, device=args.device,
                             batch_size=size["batch_size"], seq_len=size["seq_len"], compile="true", warmup_steps=5,
                             log_interval=1, plot=False, **overrides)


# -----------------------------------------------------------------------------
# the parts: each returns (passed, {what it measured}, one line)


def part_environment(args):
    import platform
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                text=True) if shutil.which("nvidia-smi") else None
        env.update(device=props.name, devices=torch.cuda.device_count(), memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", driver=driver.stdout.strip().splitlines()[0] if driver and
                   driver.returncode == 0 else "unknown", nccl=str(torch.cuda.nccl.version()),
                   bf16=torch.cuda.is_bf16_supported(), peak_tflops=(budget.peak_flops(props.name) or 0) / 1e12 or None)
        ok = env["peak_tflops"] is not None
    else:
        env.update(device=platform.processor() or platform.machine(), devices=1, threads=torch.get_num_threads())
        ok = True
    line = ", ".join(f"{k} {v}" for k, v in env.items())
    return ok, env, line + ("" if ok else "; no bf16 peak known for this device: MFU will read unknown (budget.PEAK_FLOPS)")


def part_compile(args):
    device = torch.device(args.device)
    cfg = run_config(args, os.path.join(args.out_dir, "compile"))
    torch.manual_seed(0)
    model, raw = parallel.parallelize(Llama(config_from_shape("tiny", max_seq_len=cfg.seq_len)), cfg, device, False, True)
    optimizer = make_optimizer(raw, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    loader = bench_gpu.RandomBatches(raw.config.vocab_size, cfg.batch_size, cfg.seq_len, 0)
    ctx, _ = autocast_for(device, cfg.dtype)
    with DynamoWatch() as watch:
        for step in range(8):
            parallel.update(optimizer, cfg.lr, *train.forward_backward(model, loader, step, cfg, ctx, device))  # train.py's step
            if step == 0:
                first = watch.counts()["graphs"]
        steady = watch.counts()["graphs"] - first
        x, y = loader.get_batch(8, 0)
        parallel.mean_loss(model, [(x.to(device), y.to(device))], ctx)  # the evaluation's forward (no grad)
        got = watch.counts()
    got.update(graphs_after_first_step=steady)
    ok = got["graph_breaks"] == 0 and got["recompile_limit_hits"] == 0 and steady == 0 and got["graphs"] >= 1
    return ok, got, (f"{got['graphs']} graphs traced (train and eval), {got['graph_breaks']} graph breaks, "
                     f"{got['recompile_limit_hits']} recompile-limit hits, {steady} new graphs after the first step")


def part_resume(args):
    full, resumed = os.path.join(args.out_dir, "resume", "full"), os.path.join(args.out_dir, "resume", "resumed")
    for d in (full, resumed):
        shutil.rmtree(d, ignore_errors=True)
    settings = dict(max_steps=60, ckpt_interval=30, eval_interval=30, keep_last=0, deterministic=args.device == "cuda")
    train.train(run_config(args, full, **settings))
    os.makedirs(resumed)  # the checkpoint at step 30 alone, resumed in a folder of its own
    shutil.copy(os.path.join(full, "ckpt_0000030.pt"), resumed)
    train.train(run_config(args, resumed, resume=True, **settings))
    first, again = losses(os.path.join(full, "metrics.jsonl")), losses(os.path.join(resumed, "metrics.jsonl"))
    steps = [s for s in sorted(first) if s > 30]
    diff = max(abs(first[s] - again[s]) for s in steps) if steps and all(s in again for s in steps) else float("inf")
    falls, start, end = loss_falls(first)
    got = {"loss_start": start, "loss_end": end, "loss_falls": falls, "resumed_steps": len(steps),
           "max_abs_loss_diff": diff, "tolerance": RESUME_TOLERANCE, "deterministic": settings["deterministic"]}
    return falls and diff <= RESUME_TOLERANCE, got, (f"loss {start:.3f} -> {end:.3f} over 60 steps; resumed at 30: steps 31-60 "
                                                     f"differ by at most {diff:.3g} (tolerance {RESUME_TOLERANCE:g})")


def part_fsdp(args):
    out_dir = os.path.join(args.out_dir, "fsdp")
    with DynamoWatch() as watch:
        train.train(run_config(args, out_dir, max_steps=20, eval_interval=20, ckpt_interval=20, overwrite=True,
                               parallel="fsdp", activation_checkpointing=True))
    got = watch.counts()
    falls, start, end = loss_falls(losses(os.path.join(out_dir, "metrics.jsonl")))
    got.update(loss_start=start, loss_end=end, loss_falls=falls)
    ok = falls and got["graphs"] > 0 and got["graph_breaks"] == 0 and got["recompile_limit_hits"] == 0
    return ok, got, (f"FSDP2 one rank, activation checkpointing, compiled: loss {start:.3f} -> {end:.3f} in 20 steps; "
                     f"{got['graphs']} graphs traced, {got['graph_breaks']} breaks, {got['recompile_limit_hits']} recompile-limit hits")


def part_throughput(args, fsdp):
    size = SIZES[args.device]
    _, _, world, device = parallel.setup_distributed(args.device)
    shape, seq_len, micro = size["big_shape"], size["big_seq"], size["big_batch"]
    cfg = train.TrainConfig(shape=shape, batch_size=micro, seq_len=seq_len, device=args.device, compile="true",
                            parallel="fsdp" if fsdp else "ddp", activation_checkpointing=fsdp)
    model_config = config_from_shape(shape, max_seq_len=seq_len)
    with DynamoWatch() as watch:
        tok_s, allocated, reserved = bench_gpu.bench(cfg, model_config, size["steps"], size["warmup"], dist_rank(), world, device)
    with torch.device("meta"):
        flops_per_token = Llama(model_config).flops_per_token(seq_len)
    peak = budget.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else cpu_matmul_peak()[0]
    estimate = budget.memory_per_gpu(budget.SHAPES[shape], model_config.vocab_size, model_config.tie_embeddings, micro, seq_len,
                                     1, world, cfg.parallel, fsdp)
    setting = f"{shape} {cfg.parallel} + compile{' + act. ckpt' if fsdp else ''}, micro-batch {micro} x {seq_len}"
    if tok_s is None:
        return False, {"setting": setting, "out_of_memory": True, "estimate_gib": estimate.total / 2**30}, setting + ": out of memory"
    mfu = flops_per_token * tok_s / (peak * world) if peak else None
    got = {"setting": setting, "tokens_per_s": tok_s, "mfu": mfu, "peak_allocated_gib": allocated / 2**30,
           "peak_reserved_gib": None if reserved is None else reserved / 2**30, "estimate_gib": estimate.total / 2**30,
           "allocated_over_estimate": allocated / estimate.total, **watch.counts()}
    if not fsdp and device.type == "cuda":
        got["meets_mfu_bar"] = mfu is not None and mfu >= MFU_BAR
    line = (f"{setting}: {tok_s:,.0f} tok/s, MFU {'unknown' if mfu is None else f'{100 * mfu:.1f}%'}, peak "
            f"{allocated / 2**30:.2f} GiB allocated" + ("" if reserved is None else f" / {reserved / 2**30:.2f} reserved")
            + f" vs {estimate.total / 2**30:.2f} GiB estimated (budget.py --memory)")
    return got["graph_breaks"] == 0 and got["recompile_limit_hits"] == 0, got, line


def part_series(args):
    size = SIZES[args.device]
    out_dir = os.path.join(args.out_dir, "series")
    cfg = series.SeriesConfig(out_dir=out_dir, overwrite=True, data=["default"], data_dir=args.data_dir, device=args.device,
                              compile="true", batch_size=size["batch_size"], seq_len=size["seq_len"], series_mode="grow",
                              stages=[dict(name=f"s{i}", shape=f"cpu-{i}", lr=2e-3) for i in (1, 2, 3)],
                              tokens_per_param=size["series_tpp"], warmup_steps=5, grow_warmup_steps=5, eval_interval=50,
                              eval_batches=2, ckpt_interval=1000, log_interval=50, plot=False, report=False)
    with DynamoWatch() as watch:
        series.run_series(cfg)
    got = watch.counts()
    with open(os.path.join(out_dir, "series.json")) as f:
        runs = json.load(f)["runs"]
    got.update(stages_finished=len(runs), val_loss=[r["val_loss"] for r in runs])
    ok = len(runs) == 3 and got["graph_breaks"] == 0 and got["recompile_limit_hits"] == 0
    return ok, got, (f"{len(runs)} of 3 stages finished, val loss " + " -> ".join(f"{v:.3f}" for v in got["val_loss"])
                     + f"; {got['graphs']} graphs traced, {got['graph_breaks']} breaks, "
                     f"{got['recompile_limit_hits']} recompile-limit hits")


def dist_rank():
    return int(os.environ.get("RANK", 0))


def run_part(args):
    """In the child: one part, its result written to out_dir/NAME.json (rank 0), whatever happens."""
    if args.backend == "eager":
        use_eager_backend()
    t0 = time.time()
    try:
        if args.part == "ddp_1b" or args.part == "fsdp_1b":
            ok, got, line = part_throughput(args, fsdp=args.part == "fsdp_1b")
        else:
            ok, got, line = globals()[f"part_{args.part}"](args)
        result = {"status": "pass" if ok else "fail", "detail": got, "summary": line}
    except Exception as e:  # recorded, not fatal: the next part runs
        last = traceback.format_exc().strip().splitlines()[-1]
        result = {"status": "error", "detail": {"traceback": traceback.format_exc()[-4000:]}, "summary": f"{type(e).__name__}: "
                  f"{str(e).splitlines()[0][:300] if str(e) else last}"}
    result["seconds"] = round(time.time() - t0, 1)
    if dist_rank() == 0:
        with open(os.path.join(args.out_dir, f"{args.part}.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)


# -----------------------------------------------------------------------------
# the parent: every part in a child process, time-boxed, then one JSON and one markdown table


def child_command(args, name, distributed):
    own = [os.path.abspath(__file__), "--part", name, "--device", args.device, "--out_dir", args.out_dir,
           "--data_dir", args.data_dir, "--backend", args.backend]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if distributed else [sys.executable]
    return launcher + own


def run_check(args):
    os.makedirs(args.out_dir, exist_ok=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    deadline, results = time.time() + args.budget_s, []
    for name, box, distributed in PARTS:
        if args.parts and name not in args.parts.split(","):
            continue
        left = deadline - time.time()
        if left < 10:
            results.append({"part": name, "status": "skipped", "seconds": 0, "summary": f"no time left of --budget_s={args.budget_s}"})
            continue
        box = min(box * args.box_scale, left)
        path = os.path.join(args.out_dir, f"{name}.json")
        if os.path.exists(path):
            os.remove(path)
        t0 = time.time()
        with open(os.path.join(args.out_dir, f"{name}.log"), "w") as log_file:
            child = subprocess.Popen(child_command(args, name, distributed), cwd=root, stdout=log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its own process group: a timeout ends torchrun's ranks too
            try:
                code = child.wait(timeout=box)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                code = None
        seconds = round(time.time() - t0, 1)
        if os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
        elif code is None:
            result = {"status": "timed out", "summary": f"stopped after its time box of {box:.0f} s"}
        else:
            with open(os.path.join(args.out_dir, f"{name}.log")) as f:
                tail = [line for line in f.read().splitlines() if line.strip()][-3:]
            result = {"status": "error", "summary": f"exit code {code}: " + " | ".join(tail)[-400:]}
        result.update(part=name, seconds=seconds)
        results.append(result)
        print(f"[{sum(r['seconds'] for r in results):6.1f} s] {name}: {result['status']}: {result['summary']}", flush=True)
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device, "budget_s": args.budget_s,
              "command": "python bench/gpu_check.py " + " ".join(args.argv), "parts": results}
    with open(os.path.join(args.out_dir, "gpu_check.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    table = markdown(record)
    with open(os.path.join(args.out_dir, "gpu_check.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"wrote {os.path.join(args.out_dir, 'gpu_check.json')} and gpu_check.md")


def markdown(record):
    """The parts as one table, then the paper-1B rows as BENCHMARKS.md's throughput table."""
    env = next((r["detail"] for r in record["parts"] if r["part"] == "environment" and "detail" in r), {})
    lines = [f"# `{record['command']}`, {record['date']}: " + ", ".join(f"{k} {env[k]}" for k in ("device", "driver", "torch", "cuda")
                                                                       if k in env), "",
             "| part | status | seconds | result |", "|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['status']} | {r['seconds']:.0f} | {r['summary'].replace('|', '/')} |" for r in record["parts"]]
    rows = [r["detail"] for r in record["parts"] if r["part"].endswith("_1b") and "tokens_per_s" in r.get("detail", {})]
    if rows:
        lines += ["", "| setting | tokens/s | MFU | peak allocated | peak reserved | budget.py --memory |", "|---|---|---|---|---|---|"]
        gib = lambda x: "n/a" if x is None else f"{x:.2f} GiB"
        mfu = lambda x: "unknown" if x is None else f"{100 * x:.1f}%"
        lines += [f"| {d['setting']} | {d['tokens_per_s']:,.0f} | {mfu(d['mfu'])} | {gib(d['peak_allocated_gib'])} | "
                  f"{gib(d['peak_reserved_gib'])} | {gib(d['estimate_gib'])} |" for d in rows]
    return "\n".join(lines)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out_dir", default="out/gpu_check", help="where the JSON, the table and each part's log go")
    p.add_argument("--data_dir", default="data_cache", help="where the embedded corpus is prepared (once, then reused)")
    p.add_argument("--budget_s", type=float, default=None, help="seconds for the whole check (default 450 on CUDA, 900 on the CPU)")
    p.add_argument("--parts", default="", help=f"comma-separated, a subset of {', '.join(n for n, _, _ in PARTS)} (default all)")
    p.add_argument("--backend", default=None, choices=["inductor", "eager"], help="torch.compile's (default inductor on CUDA, "
                   "eager on the CPU)")
    p.add_argument("--part", help=argparse.SUPPRESS)  # a child: run this part only
    p.error = lambda msg: (print(f"error: {msg}", file=sys.stderr), sys.exit(2))  # one line, not usage + error
    args = p.parse_args(argv)
    args.argv = argv
    with cli_errors():
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("no CUDA device here: gpu_check.py checks a GPU; --device cpu runs its parts at toy sizes")
        unknown = set(filter(None, args.parts.split(","))) - {n for n, _, _ in PARTS}
        if unknown:
            raise ConfigError(f"--parts {args.parts!r}: unknown {', '.join(sorted(unknown))}; the parts are "
                              + ", ".join(n for n, _, _ in PARTS))
        args.backend = args.backend or ("inductor" if args.device == "cuda" else "eager")
        args.budget_s = args.budget_s or (450 if args.device == "cuda" else 900)
        args.box_scale = 1 if args.device == "cuda" else 3  # two shared cores: the CPU's boxes are wider
        if args.part:
            run_part(args)
        else:
            run_check(args)


if __name__ == "__main__":
    main(sys.argv[1:])
