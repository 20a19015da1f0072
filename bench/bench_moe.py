"""
bench_moe.py: what routing costs, and how evenly a trained mixture of experts uses its experts.

    python bench_moe.py                                   # cpu-4 as 4 experts, top-2, against its dense twin
    python bench_moe.py --experts 8 --top_k 1             # Switch's k
    python bench_moe.py --load CKPT [--val data_cache/default-bytes]   # the expert load of a trained model

Throughput: the mixture of experts (model.SparseMoE) against the dense Llama of the same active size, the same
shape with ffn_dim = top_k x the expert's (their active parameters differ only by the routers, E x d per
layer). Both are timed in this one process on the same random batch, for a training step (forward, backward,
AdamW) and for a forward alone (no gradients), in rounds that alternate which goes first, so a slow moment
of the machine hits both; the ratio is the median over rounds of each round's ratio (MoE / dense). Both are
freshly initialized: the routers (std 0.02) spread the tokens nearly evenly, as a well balanced model does.

Load: the fraction of each layer's top-k choices that went to each expert over fixed validation batches
(data.val_batches), from the model's own expert_counts; 1/E each at perfect balance. Also the mean
load-balancing loss (model.load_balancing_loss: top_k at balance).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one folder up
import data
from checkpoint import load_checkpoint, model_from_checkpoint
from common import ConfigError, cli_errors
from model import Llama, config_from_shape


def step_time(model, optimizer, idx, steps, train):
    """Seconds per step, the median over `steps` steps."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        if train:
            loss = model(idx, idx)[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(idx)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def throughput(args):
    moe_cfg = config_from_shape(args.shape, moe_experts=args.experts, moe_top_k=args.top_k)
    dense_cfg = config_from_shape(args.shape, ffn_dim=args.top_k * moe_cfg.ffn_dim)
    torch.manual_seed(0)
    models = {"MoE": Llama(moe_cfg), "dense": Llama(dense_cfg)}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    idx = torch.randint(0, moe_cfg.vocab_size, (args.batch_size, moe_cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
    tokens = idx.numel()
    print(f"# {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} threads; {args.shape}: "
          f"MoE {args.experts} experts top-{args.top_k}: {models['MoE'].num_params(True):,} non-embedding parameters, "
          f"{models['MoE'].num_params(True, active=True):,} active; dense ffn_dim {dense_cfg.ffn_dim}: "
          f"{models['dense'].num_params(True):,}; batch {args.batch_size} x {moe_cfg.max_seq_len} tokens, "
          f"{args.rounds} rounds of {args.steps} steps each")
    print("| what | MoE tokens/s | dense tokens/s | MoE / dense (median, min-max over rounds) |")
    print("|---|---|---|---|")
    for train in (True, False):
        for name, m in models.items():  # warm-up: allocator, first AdamW step
            m.train(train)
            step_time(m, optimizers[name], idx, 2, train)
        per = {name: [] for name in models}
        ratios = []
        for r in range(args.rounds):
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            t = {name: step_time(models[name], optimizers[name], idx, args.steps, train) for name in order}
            for name in models:
                per[name].append(tokens / t[name])
            ratios.append(t["dense"] / t["MoE"])
        label = "training step (fwd + bwd + AdamW)" if train else "forward, no gradients"
        print(f"| {label} | {statistics.median(per['MoE']):,.0f} | {statistics.median(per['dense']):,.0f} | "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |")


@torch.no_grad()
def expert_load(model, batches):
    """(fraction of the top-k choices per expert, an (n_layers, E) tensor; mean load-balancing loss) over batches."""
    model.eval()
    counts, aux = 0, []
    for x, _ in batches:
        model(x)
        counts = counts + model.expert_counts
        aux.append(model.aux_loss.item())
    return counts / counts.sum(1, keepdim=True), sum(aux) / len(aux)


def load(args):
    ckpt = load_checkpoint(args.load)
    model = model_from_checkpoint(ckpt)
    c = model.config
    if not c.moe_experts:
        raise ConfigError(f"{args.load} holds a dense model: nothing is routed; give a mixture of experts' checkpoint")
    seq = ckpt.get("train_config", {}).get("seq_len", c.max_seq_len)
    fractions, aux = expert_load(model, data.val_batches(args.val, args.batch_size, seq, args.batches))
    E = c.moe_experts
    print(f"# {args.load}: {E} experts, top-{c.moe_top_k}; {args.batches} validation batches of {args.batch_size} x {seq} "
          f"tokens from {args.val}; share of each layer's top-k choices (1/E = {1 / E:.3f} at balance)")
    print("| layer | " + " | ".join(f"expert {e}" for e in range(E)) + " | max / min |")
    print("|---|" + "---|" * (E + 1))
    for layer, f in enumerate(fractions.tolist()):
        print(f"| {layer} | " + " | ".join(f"{x:.3f}" for x in f) + f" | {max(f) / max(min(f), 1e-12):.2f} |")
    print(f"mean load-balancing loss {aux:.4f} (top_k = {c.moe_top_k} at perfect balance)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="cpu-4")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps of each model per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--load", help="a trained MoE checkpoint: print its expert load instead")
    p.add_argument("--val", default=os.path.join("data_cache", "default-bytes"), help="prepared data (data.py) for --load")
    p.add_argument("--batches", type=int, default=8, help="validation batches for --load")
    args = p.parse_args()
    with cli_errors(ValueError):  # a missing file or folder, a bad shape: one line, exit code 2
        load(args) if args.load else throughput(args)


if __name__ == "__main__":
    main()
