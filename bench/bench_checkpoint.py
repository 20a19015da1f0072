"""
bench_checkpoint.py: what the checkpoint guarantees cost, against plain torch.save / torch.load, in one run.

    python bench_checkpoint.py                  # pu4 (an 85M-parameter Llama) with its AdamW state
    python bench_checkpoint.py --shape pu5 --repeats 5

A train.py checkpoint of the shape (weights, both AdamW moments, RNG states) is written and read in a
temporary folder: plain torch.save against checkpoint.save_checkpoint (sha256 over every tensor, the
NaN/inf check, fsync, rename), plain torch.load against checkpoint.load_checkpoint (weights_only=True and
the checksum), and the verification that pruning does before it deletes an older file
(checkpoint.verifies: a memory-mapped load). Times are medians over --repeats alternated rounds; the
ratios are the figures to quote, since both sides ran on the same machine at the same time.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one folder up
import checkpoint
from checkpoint import Lineage, load_checkpoint, make_checkpoint, payload_digest, save_checkpoint
from common import make_optimizer, rng_state
from model import Llama, config_from_shape
from parallel import optimizer_state


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def train_checkpoint(shape):
    """A checkpoint as train.py writes it, with AdamW's moments filled (one step on random gradients)."""
    torch.manual_seed(0)
    model = Llama(config_from_shape(shape))
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    return make_checkpoint(model.state_dict(), model.config, {"name": "gpt2", "vocab_size": model.config.vocab_size}, Lineage(),
                           step=1, optimizer=optimizer_state(model, optimizer), rng=rng_state())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--shape", default="pu4")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    ckpt = train_checkpoint(a.shape)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        plain, ours = os.path.join(tmp, "plain.pt"), os.path.join(tmp, "ours.pt")
        rows = {k: [] for k in ("torch.save", "save_checkpoint", "torch.load", "load_checkpoint", "verify (mmap)", "digest")}
        for _ in range(a.repeats):  # alternated, so drift on a shared machine hits both sides alike
            rows["torch.save"].append(timed(lambda: torch.save(ckpt, plain)))
            rows["save_checkpoint"].append(timed(lambda: save_checkpoint(ckpt, ours)))
            rows["torch.load"].append(timed(lambda: torch.load(plain, weights_only=False)))
            rows["load_checkpoint"].append(timed(lambda: load_checkpoint(ours)))
            checkpoint._verified.clear()  # measure the read, not the cache
            rows["verify (mmap)"].append(timed(lambda: checkpoint.verifies(ours)))
            rows["digest"].append(timed(lambda: payload_digest(ckpt)))
        size = os.path.getsize(ours)
    med = {k: statistics.median(v) for k, v in rows.items()}
    n_params = sum(t.numel() for t in {t.data_ptr(): t for t in ckpt["model"].values()}.values())  # a tied head once
    print(f"shape {a.shape}: {n_params:,} parameters, checkpoint {size / 2**30:.2f} GiB, "
          f"median of {a.repeats}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'':<18}{'seconds':>9}{'GiB/s':>8}{'ratio':>8}")
    for k, ref in (("torch.save", None), ("save_checkpoint", "torch.save"), ("torch.load", None), ("load_checkpoint", "torch.load"),
                   ("verify (mmap)", "torch.load"), ("digest", None)):
        ratio = f"{med[k] / med[ref]:.2f}x" if ref else ""
        print(f"{k:<18}{med[k]:>9.2f}{size / 2**30 / med[k]:>8.2f}{ratio:>8}")


if __name__ == "__main__":
    main()
