"""
bench_train.py: training throughput on this machine, measured side by side in one run.

    python bench_train.py                              # nanogrow's tiny config, compile off and on
    python bench_train.py --nanogpt /path/to/nanoGPT   # and nanoGPT's train.py on the matched shape
    python bench_train.py --nanogpt /path/to/nanoGPT --in_process 60   # the models alone, and what each part costs
    python bench_train.py --nanogpt /path/to/nanoGPT --profile 20      # where each step goes, operator by operator

Every figure comes from a fresh subprocess running the real train.py (nanogrow's, and nanoGPT's when
its folder is given), so start-up, data loading and logging are included as a user would see them.
Per-step time is the median over the steps after a warm-up, and the median of --repeats runs
alternated with each other; MFU is against the machine's measured
float32 matmul peak (common.cpu_matmul_peak, as train.py's); peak memory is the process's max resident set size.
The matched shape: 4 layers, d 128, 4 heads, context 256, batch 16, float32, no compile, byte
vocabulary (320 ids), no dropout. nanoGPT's GPT has a 4x GELU MLP (512) where nanogrow's Llama has
SwiGLU 352, which gives both 0.8M non-embedding parameters.

--in_process N times the two models alone (forward, backward, clipping, AdamW on one fixed batch, no compile) in
one process, one step of each in turn for N rounds, so that the machine's slow moments hit all of them; and,
to say what each part of the Llama block costs against nanoGPT's GPT-2 block, nanogrow's model with one part
swapped: the plain expressions ops.py replaces, LayerNorm for RMSNorm, no RoPE, nanoGPT's GELU MLP for
SwiGLU, and AdamW's multi-tensor kernel (nanoGPT's on the CPU) for the fused one. The swapped models compute
something else: they are timings, not models.

--profile N runs torch.profiler over N alternated steps of nanogrow's model and nanoGPT's GPT and gives each
operator's self time per step to the model it ran in: which operators the two blocks share (matmuls,
attention) and which one has alone.
"""

import argparse
import bisect
import collections
import contextlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one folder up
import data
import common
import model as model_py
import ops
from model import Llama, config_from_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py and configs/
MAXRSS = "import resource, runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, '.');" \
         "exec('try:\\n runpy.run_path(sys.argv[0], run_name=\"__main__\")\\nfinally:\\n print(\"MAXRSS_KB\", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)')"


def run(cmd, cwd):
    out = subprocess.run([sys.executable, "-c", MAXRSS, *cmd], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"benchmark run failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    rss = int(re.findall(r"MAXRSS_KB (\d+)", out.stdout)[-1])
    return out.stdout, rss / 1024


def nanogrow(steps, compile_, data_dir, out_dir):
    args = ["train.py", "configs/tiny_cpu.py", f"--max_steps={steps}", "--log_interval=1", f"--eval_interval={10 * steps}",
            "--eval_batches=1", f"--ckpt_interval={10 * steps}", "--warmup_steps=5", f"--compile={compile_}", "--plot=False",
            f"--data_dir={data_dir}", f"--out_dir={out_dir}"]
    stdout, rss = run(args, ROOT)
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl")) if '"loss"' in l]
    tokens_per_step = 16 * 256
    ms = statistics.median(tokens_per_step / r["tok_s"] * 1000 for r in rows[10:])
    return ms, rss


def nanogpt(steps, nanogpt_dir, data_dir):
    # nanoGPT reads data/<dataset>/{train,val}.bin as flat uint16 ids plus meta.pkl: the format data.py writes
    ds = os.path.join(nanogpt_dir, "data", "nanogrow_bytes")
    os.makedirs(ds, exist_ok=True)
    for split in ("train", "val"):
        shutil.copyfile(os.path.join(data_dir, "default-bytes", f"{split}.bin"), os.path.join(ds, f"{split}.bin"))
    with open(os.path.join(ds, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": 320}, f)
    args = ["train.py", "--dataset=nanogrow_bytes", "--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=256",
            "--batch_size=16", "--gradient_accumulation_steps=1", "--dropout=0.0", "--bias=False", "--compile=False",
            "--device=cpu", "--dtype=float32", f"--max_iters={steps}", "--lr_decay_iters=1000", "--eval_interval=100000",
            "--eval_iters=1", "--log_interval=1", "--always_save_checkpoint=False", f"--out_dir={tempfile.mkdtemp()}"]
    stdout, rss = run(args, nanogpt_dir)
    times = [float(t) for t in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", stdout)]
    return statistics.median(times[10:]), rss


@contextlib.contextmanager
def swapped(**ops_in_model):
    """model.py with some of its ops replaced (model.py looks them up at call time), restored afterwards."""
    saved = {name: getattr(model_py, name) for name in ops_in_model}
    for name, op in ops_in_model.items():
        setattr(model_py, name, op)
    try:
        yield
    finally:
        for name, op in saved.items():
            setattr(model_py, name, op)


def models(nanogpt_dir):
    """{name: ((model, AdamW), ops to swap into model.py while it runs)}: nanogrow's tiny Llama, the same with one
    part of the block swapped, and nanoGPT's GPT on the matched shape when its checkout is given."""
    def nanogrow_model(mlp_512_gelu=False, foreach_adamw=False):
        torch.manual_seed(0)
        m = Llama(config_from_shape("tiny"))
        if mlp_512_gelu:  # nanoGPT's MLP: 4 d, GELU
            for block in m.layers:
                block.mlp = torch.nn.Sequential(torch.nn.Linear(128, 512, bias=False), torch.nn.GELU(),
                                                torch.nn.Linear(512, 128, bias=False))
        opt = common.make_optimizer(m, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
        if foreach_adamw:  # the same groups, torch's multi-tensor kernel: what nanoGPT's AdamW is on the CPU
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
            opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), foreach=True)
        return m, opt

    layer_norm = lambda x, weight, eps: torch.nn.functional.layer_norm(x, x.shape[-1:], weight, None, eps)
    runs = {"nanogrow (ops.py)": (nanogrow_model(), {}),
            "nanogrow, the plain expressions instead of ops.py": (nanogrow_model(), dict(
                rms_norm=ops.rms_norm_plain, apply_rope=ops.apply_rope_plain, silu_mul=ops.silu_mul_plain)),
            "nanogrow, LayerNorm for RMSNorm": (nanogrow_model(), dict(rms_norm=layer_norm)),
            "nanogrow, no RoPE": (nanogrow_model(), dict(apply_rope=lambda x, cos, sin: x)),
            "nanogrow, GELU MLP 512 for SwiGLU 352": (nanogrow_model(mlp_512_gelu=True), {}),
            "nanogrow, foreach AdamW for the fused one": (nanogrow_model(foreach_adamw=True), {})}
    if nanogpt_dir:
        spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(nanogpt_dir, "model.py"))
        gpt = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gpt)
        m = gpt.GPT(gpt.GPTConfig(block_size=256, vocab_size=320, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False))
        runs["nanoGPT's GPT"] = ((m, m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")), {})
    return runs


def train_step(m, opt, x, y):
    """One training step as train.py takes it, on a fixed batch: forward, backward, clipping, AdamW."""
    _, loss = m(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def in_process(rounds, nanogpt_dir, warmup=5):
    """Median ms per step of each model (one step of each per round, after `warmup` rounds), and its ratio to
    nanoGPT's GPT. Returns the markdown rows."""
    torch.manual_seed(0)
    x, y = torch.randint(0, 320, (2, 16, 256))
    runs = models(nanogpt_dir)
    times = {name: [] for name in runs}
    for i in range(rounds + warmup):
        for name, ((m, opt), swap) in runs.items():
            with swapped(**swap):
                t0 = time.perf_counter()
                train_step(m, opt, x, y)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["nanoGPT's GPT"]) if nanogpt_dir else None
    rows = [f"| model, in one process ({rounds} steps each, median) | ms/step | vs nanoGPT's GPT |", "|---|---|---|"]
    for name, ts in times.items():
        ms = statistics.median(ts)
        rows.append(f"| {name} | {1000 * ms:.1f} | " + (f"{ms / ref:.3f}x |" if ref else "- |"))
    return rows


def profile(rounds, nanogpt_dir, top=20, warmup=5):
    """Where each model's step goes: torch.profiler over `rounds` alternated steps of nanogrow's model and
    nanoGPT's GPT, each operator's self time given to the model whose step it ran in (by time: the step's
    record_function range; on the CPU, backward runs on the calling thread). Returns the markdown rows: the
    `top` operators by their total, in ms per step."""
    torch.manual_seed(0)
    x, y = torch.randint(0, 320, (2, 16, 256))
    runs = {name: run for name, run in models(nanogpt_dir).items() if name in ("nanogrow (ops.py)", "nanoGPT's GPT")}
    for _ in range(warmup):
        for (m, opt), _swap in runs.values():
            train_step(m, opt, x, y)
    with torch.profiler.profile() as prof:
        for _ in range(rounds):
            for name, ((m, opt), _swap) in runs.items():
                with torch.profiler.record_function("step: " + name):
                    train_step(m, opt, x, y)
    events = prof.events()
    steps = sorted((e.time_range.start, e.time_range.end, e.name[len("step: "):]) for e in events if e.name.startswith("step: "))
    starts = [s[0] for s in steps]
    self_ms = {name: collections.Counter() for name in runs}
    for e in events:
        i = bisect.bisect_right(starts, e.time_range.start) - 1
        if e.name.startswith("step: ") or i < 0 or e.time_range.start > steps[i][1]:
            continue
        self_ms[steps[i][2]][e.name] += e.self_cpu_time_total / 1000 / rounds
    names = list(runs)
    ops_by_total = sorted(set().union(*self_ms.values()), key=lambda op: -sum(self_ms[n][op] for n in names))
    rows = [f"| operator (self time, ms per step, {rounds} alternated steps) | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names)]
    for op in ops_by_total[:top]:
        rows.append(f"| {op} | " + " | ".join(f"{self_ms[n][op]:.2f}" for n in names) + " |")
    rows.append("| all operators | " + " | ".join(f"{sum(self_ms[n].values()):.1f}" for n in names) + " |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternated; the table shows the median (min-max)")
    p.add_argument("--nanogpt", help="a checkout of karpathy/nanoGPT (not part of nanogrow)")
    p.add_argument("--data_dir", default="data_cache")
    p.add_argument("--in_process", type=int, default=0, help="N: time the models alone in one process, N steps each")
    p.add_argument("--profile", type=int, default=0, help="N: where each model's step goes, by operator, over N steps each")
    args = p.parse_args()
    data.prepare("default", "bytes", out_dir=os.path.join(args.data_dir, "default-bytes"))
    model = Llama(config_from_shape("tiny"))
    flops_per_token = model.flops_per_token(256)
    peak, _ = common.cpu_matmul_peak()  # train.py's own: measured once per machine, cached
    print(f"# {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {os.cpu_count()} CPU threads, "
          f"measured float32 matmul peak {peak / 1e9:.0f} GFLOP/s; tiny: {model.num_params(True):,} non-embedding parameters, "
          f"{flops_per_token / 1e6:.2f} MFLOPs per token (with attention)")
    if args.in_process:
        print("\n".join(in_process(args.in_process, args.nanogpt)))
        return
    if args.profile:
        print("\n".join(profile(args.profile, args.nanogpt)))
        return
    print(f"| run ({args.repeats} runs each, median) | ms/step (min-max) | tokens/s | MFU | peak RSS |")
    print("|---|---|---|---|---|")
    tmp = tempfile.mkdtemp()
    runs = [("nanogrow tiny, compile off", lambda i: nanogrow(args.steps, "false", args.data_dir, os.path.join(tmp, f"off{i}"))),
            ("nanogrow tiny, compile on", lambda i: nanogrow(args.steps, "true", args.data_dir, os.path.join(tmp, f"on{i}")))]
    if args.nanogpt:
        runs.append(("nanoGPT train.py, matched shape", lambda i: nanogpt(args.steps, args.nanogpt, args.data_dir)))
    results = {name: [] for name, _ in runs}
    for i in range(args.repeats):  # alternate the runs so that a slow moment of the machine hits all of them
        for name, fn in runs:
            results[name].append(fn(i))
    for name, rs in results.items():
        ms = statistics.median(r[0] for r in rs)
        tok_s = 16 * 256 / (ms / 1000)
        spread = f" ({min(r[0] for r in rs):.1f}-{max(r[0] for r in rs):.1f})" if len(rs) > 1 else ""
        print(f"| {name} | {ms:.1f}{spread} | {tok_s:,.0f} | {100 * flops_per_token * tok_s / peak:.1f}% | {max(r[1] for r in rs):,.0f} MiB |")

if __name__ == "__main__":
    main()
