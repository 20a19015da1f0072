"""torch.compile sees one graph per training step: no graph break in the model's forward and backward, so
inductor can fuse the whole step (the CPU shows what dynamo does on every device). Captured with
fullgraph=True on the "eager" backend: dynamo's tracing without inductor's code generation, in seconds.

Every path of train.py's step through parallel.parallelize, with a counting backend in place of inductor: one
process, DDP and FSDP (a process group of one rank, in this process), dense and a mixture of experts, with and
without activation checkpointing; its loss and gradients against the same step uncompiled. Then a series of three
stages in one process, compiled, under a recompile limit it would pass without dynamo's reset between stages."""

import contextlib
import os
import sys

import pytest
import torch
import torch._dynamo.testing
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ops  # noqa: E402
import parallel  # noqa: E402
from common import configure, make_optimizer, read_jsonl  # noqa: E402
from model import Llama, ModelConfig, config_from_shape  # noqa: E402
from train import TrainConfig, forward_backward  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def one_graph(fn, *args):
    """fn compiled with fullgraph=True (a graph break raises) and run; its output, and dynamo's frame count."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    out = torch.compile(fn, backend=counter, fullgraph=True)(*args)
    return out, counter.frame_count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_function_is_one_graph(dtype):
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(16, requires_grad=True)  # float32 gain on bf16 activations: the promoting branch
    out, frames = one_graph(lambda x, w: ops.rms_norm(x, w, 1e-5), x, w)
    assert frames == 1
    assert torch.equal(out, ops.rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("shape", ["cpu-1", "tiny"])
def test_a_training_step_of_the_model_is_one_graph(shape):
    torch.manual_seed(0)
    model = Llama(config_from_shape(shape))
    idx = torch.randint(0, model.config.vocab_size, (2, 16))

    def step(idx):  # the forward to the loss; its backward is the same graph's, traced by AOTAutograd
        return model(idx, idx)[1]

    loss, frames = one_graph(step, idx)
    loss.backward()
    assert frames == 1
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = step(idx)
    eager.backward()
    assert torch.allclose(loss, eager, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6) for g, p in zip(grads, model.parameters()))


class FixedBatches:
    """get_batch(step, micro) as data.BatchLoader's: random tokens, a pure function of (step, micro)."""

    def __init__(self, vocab_size, batch_size=2, seq_len=16):
        self.vocab_size, self.shape = vocab_size, (batch_size, seq_len + 1)

    def get_batch(self, step, micro):
        tokens = torch.randint(0, self.vocab_size, self.shape, generator=torch.Generator().manual_seed(1000 * step + micro))
        return tokens[:, :-1], tokens[:, 1:]


@contextlib.contextmanager
def process_group():
    """A gloo process group of one rank in this process (what torchrun makes for each rank)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def train_step(model, raw, cfg, steps=2):
    """train.py's step (forward_backward over grad_accum micro-batches, clipping, parallel.update) `steps` times:
    the losses, and the last step's gradients by parameter name (FSDP's gathered)."""
    optimizer = make_optimizer(raw, 1e-2, 0.1, (0.9, 0.95), torch.device("cpu"))
    batches, losses = FixedBatches(raw.config.vocab_size), []
    for step in range(steps):
        loss, grad_norm, aux = forward_backward(model, batches, step, cfg, contextlib.nullcontext(), torch.device("cpu"))
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone() for n, p in raw.named_parameters()}
        losses.append(parallel.update(optimizer, 1e-2, loss, grad_norm, aux))
    return losses, grads


PATHS = [(path, moe, ac) for path in ("one process", "ddp", "fsdp") for moe in (0, 4) for ac in (False, True)]


@pytest.mark.parametrize("path, moe, ac", PATHS, ids=[f"{p}-{'moe' if m else 'dense'}{'-ac' if a else ''}" for p, m, a in PATHS])
def test_every_path_of_a_training_step_is_one_graph_and_computes_what_eager_does(path, moe, ac):
    config = ModelConfig(d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=64, moe_experts=moe, moe_top_k=2)
    cfg = TrainConfig(activation_checkpointing=ac, grad_accum=2, dtype="float32")
    torch.manual_seed(0)
    weights = Llama(config).state_dict()
    eager = Llama(config)
    eager.load_state_dict(weights)
    expected = train_step(*parallel.parallelize(eager, cfg, torch.device("cpu"), fsdp=False, compiled=False), cfg)
    counter = torch._dynamo.testing.CompileCounter()
    counters.clear()
    with process_group() if path != "one process" else contextlib.nullcontext():
        model = Llama(config)
        model.load_state_dict(weights)
        model, raw = parallel.parallelize(model, cfg, torch.device("cpu"), fsdp=path == "fsdp", compiled=True, backend=counter)
        assert isinstance(model, DistributedDataParallel) == (path == "ddp")
        assert all(block.checkpointed == ac for block in raw.layers)
        got = train_step(model, raw, cfg)
    # fullgraph=True: a graph break would have raised. One graph for the step (under FSDP each block's, which every
    # block shares), and nothing compiled again for the second step or the second micro-batch
    assert counter.frame_count == 1 and counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert [n for n, _ in raw.named_parameters()] == [n for n, _ in eager.named_parameters()]  # names unchanged
    for (loss, norm, aux), (loss_e, norm_e, aux_e) in zip(got[0], expected[0]):
        assert loss == pytest.approx(loss_e, rel=1e-5) and norm == pytest.approx(norm_e, rel=1e-4)
        assert aux == pytest.approx(aux_e, rel=1e-5) and (aux > 0) == bool(moe)
    assert all(torch.allclose(got[1][n], g, rtol=1e-4, atol=1e-6) for n, g in expected[1].items())


def test_ddp_splits_the_one_graph_at_its_buckets(monkeypatch):
    # dynamo's DDP optimizer, inside DDP's forward, compiles the graph in pieces at DDP's gradient buckets, so that each
    # bucket's all-reduce starts while the rest of the backward runs: with 1 MB buckets, several pieces of one graph
    class SmallBuckets(DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, bucket_cap_mb=1, **kwargs)

    monkeypatch.setattr(parallel, "DistributedDataParallel", SmallBuckets)
    config = ModelConfig(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=512)  # 0.8M parameters, 3 MB, a block
    counter = torch._dynamo.testing.CompileCounter()
    counters.clear()
    with process_group():
        model, raw = parallel.parallelize(Llama(config), TrainConfig(grad_accum=1), torch.device("cpu"), fsdp=False,
                                          compiled=True, backend=counter)
        assert not model.forward_sync_buffers
        assert model.gradient_as_bucket_view
        train_step(model, raw, TrainConfig(grad_accum=1), steps=1)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"] and counter.frame_count > 3


def test_a_non_finite_step_leaves_weights_and_adamw_as_they_were():
    # parallel.update drops the update on the device (fused AdamW's found_inf): the weights, the moments and the
    # step counts stay bit for bit; a finite step after it updates as if the bad one had not happened
    torch.manual_seed(0)
    model = Llama(ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, vocab_size=64))
    optimizer = make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), torch.device("cpu"))
    x = torch.randint(0, 64, (2, 8))

    def step(scale):
        loss = model(x, x)[1] * scale
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return parallel.update(optimizer, 1e-2, loss, norm, torch.zeros(()))

    step(1.0)
    before = ({n: p.detach().clone() for n, p in model.named_parameters()},
              {n: {k: v.clone() for k, v in s.items()} for n, s in parallel.optimizer_state(model, optimizer)["state"].items()})
    loss, norm, _ = step(float("nan"))
    assert loss != loss and norm != norm  # NaN, read back after the (dropped) update
    assert all(torch.equal(p, before[0][n]) for n, p in model.named_parameters())
    after = parallel.optimizer_state(model, optimizer)["state"]
    assert all(torch.equal(after[n][k], v) for n, s in before[1].items() for k, v in s.items())
    step(1.0)
    assert int(parallel.optimizer_state(model, optimizer)["state"]["lm_head.weight"]["step"]) == 2


def test_a_series_in_one_process_compiles_each_stage_afresh(tmp_path, monkeypatch):
    # three stages (grown), each run compiled (a counting backend through parallel.parallelize), under a recompile
    # limit of 3: a stage needs 2 entries for Llama.forward (its train graph and its eval graph, grad mode and shapes
    # differ), so without dynamo's reset between stages the third stage would pass it, and with fullgraph=True raise
    import series
    counter = torch._dynamo.testing.CompileCounter()
    monkeypatch.setattr(parallel, "parallelize", lambda *a, **k: parallel_parallelize(*a, **k, backend=counter))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 3)
    counters.clear()
    cfg = configure(series.SeriesConfig, [
        f"--out_dir={tmp_path / 'series'}", f"--data_dir={tmp_path / 'data'}", "--max_data_tokens=200000", "--compile=true",
        "--stages=" + str([{"name": n, "shape": f"cpu-{i}", "lr": 3e-3} for i, n in ((1, "a"), (2, "b"), (3, "c"))]),
        "--series_mode=grow", "--grow_schedule=continue", "--tokens_per_param=0.03", "--batch_size=4", "--seq_len=64", "--warmup_steps=2", "--eval_batches=2",
        "--eval_interval=1000", "--log_interval=1", "--ckpt_interval=1000", "--plot=false", "--report=false"])
    series.run_series(cfg)
    rows = lambda name: [r for r in read_jsonl(tmp_path / "series" / "grow" / name / "metrics.jsonl") if "loss" in r]
    graphs = [max(r["graphs"] for r in rows(name)) for name in "abc"]
    assert graphs == [2, 2, 2]  # each stage's: its evaluation's at step 0, its training step's
    assert counter.frame_count == 6 and not counters["graph_break"]  # 3 stages x (train, eval)
    assert all(r["tok_s"] is None for name in "abc" for r in rows(name)[:1])  # the step that compiled is not timed


parallel_parallelize = parallel.parallelize
