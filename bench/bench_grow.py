"""
bench_grow.py: the cost of one growth step at the paper's scale, on the CPU.

    python bench_grow.py                      # paper-1B -> paper-2B, float32, fpi + zero
    python bench_grow.py --src cpu-3 --dst cpu-4   # a quick check of the script itself

Measures the wall time of grow() (not the source's initialization), the peak resident memory
(getrusage maxrss, after building the source and after growing), and the largest single allocation
made while growing (every aten op watched by a dispatch mode, so temporaries count too), against the
largest parameter of the target. Then the function gap on a short batch, in float32 (a float64 copy
of a 2B model would not fit next to the two float32 ones). Needs about 15 GB for 1B -> 2B.
"""

import argparse
import datetime
import math
import os
import platform
import resource
import sys
import time

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one folder up
from grow import function_gap, grow
from model import Llama, config_from_shape, rope_cos_sin


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class LargestAllocation(TorchDispatchMode):
    """Sees every aten op run under it and keeps the largest storage an op returned that none of its
    inputs had (a new allocation): one record for to_empty's empty_like (the target's parameters),
    one for everything else (grow's temporaries)."""

    def __init__(self):
        super().__init__()
        self.largest = {"parameter": (0, None), "temporary": (0, None)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        kind = "parameter" if func is torch.ops.aten.empty_like.default else "temporary"
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in seen:
                self.largest[kind] = max(self.largest[kind], (t.untyped_storage().nbytes(), str(func)), key=lambda x: x[0])
        return out


def random_llama(config, seed=0):
    """A Llama with GPT-2-style random weights, filled in place (faster than Llama(config)'s init,
    which runs nn.Linear's own init before overwriting it)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        m = Llama(config)
    m = m.to_empty(device="cpu")
    if config.tie_embeddings:  # to_empty gives the tied matrix two storages: tie it again
        m.lm_head.weight = m.embed_tokens.weight
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape))  # RMSNorm gains, not all ones
            else:
                std = 0.02 / math.sqrt(2 * config.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.normal_(0.0, std)
        cos, sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.rope_theta)
        m.rope_cos.copy_(cos)
        m.rope_sin.copy_(sin)
    return m


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--src", default="paper-1B")
    p.add_argument("--dst", default="paper-2B")
    p.add_argument("--width", default="fpi")
    p.add_argument("--depth", default="zero")
    p.add_argument("--gap_tokens", type=int, default=32, help="0 skips the gap")
    args = p.parse_args()
    src_cfg, dst_cfg = config_from_shape(args.src), config_from_shape(args.dst)
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')} {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads")

    t0 = time.perf_counter()
    model = random_llama(src_cfg)
    print(f"source {args.src}: {model.num_params(False):,} parameters ({model.num_params(False) * 4 / 1e9:.2f} GB fp32), "
          f"init {time.perf_counter() - t0:.1f} s (not counted); peak RSS so far {peak_rss_gb():.2f} GiB")

    with LargestAllocation() as largest:
        t0 = time.perf_counter()
        new = grow(model, dst_cfg, width=args.width, depth=args.depth, seed=0)
        seconds = time.perf_counter() - t0
    largest_param = max(p.numel() * p.element_size() for p in new.parameters())
    print(f"grown  {args.dst}: {new.num_params(False):,} parameters ({new.num_params(False) * 4 / 1e9:.2f} GB fp32), "
          f"{args.width}+{args.depth}")
    print(f"grow wall time {seconds:.1f} s (with every op watched by LargestAllocation; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus)")
    print(f"peak RSS {peak_rss_gb():.2f} GiB (source + grown + temporaries)")
    for kind, (nbytes, op) in largest.largest.items():
        print(f"largest {kind} allocation while growing: {nbytes / 2**20:.1f} MiB ({op})")
    print(f"largest target parameter {largest_param / 2**20:.1f} MiB")
    if args.gap_tokens:
        idx = torch.randint(0, src_cfg.vocab_size, (1, args.gap_tokens), generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        gap = function_gap(model, new, idx, dtype=torch.float32)
        print(f"function gap (float32, 1 x {args.gap_tokens} random tokens): {gap:.3e} ({time.perf_counter() - t0:.1f} s); "
              f"peak RSS {peak_rss_gb():.2f} GiB")


if __name__ == "__main__":
    main()
