"""Mixture of experts (model.SparseMoE, Mixtral's layout) and upcycling (grow.py, rule U).

Checked against independent references: transformers' MixtralForCausalLM (logits, the load-balancing loss,
the training loss with labels) from an exported folder, and a per-token float64 loop written from the
definition (outputs and gradients of the grouped dispatch). Upcycling is exact in float64 (dense into MoE at
the same shape, with width and depth growth in one call, MoE into a wider and deeper MoE); copied experts are
told apart by routing; an expert without tokens still gets a (zero) gradient. Then train.py (aux_loss logged,
validation pure cross-entropy, a killed MoE run resumes bit for bit, DDP and FSDP with idle experts match one
process, a run checkpointed before the MoE fields resumes) and series.py (a stage that upcycles, budgeted by
active parameters; the branch mode at equal FLOPs)."""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from checkpoint import Lineage, load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from common import configure  # noqa: E402
from grow import function_gap, grow  # noqa: E402
from hf import export_hf, import_hf  # noqa: E402
from model import Llama, ModelConfig, SparseMoE, config_from_dict, config_from_shape, load_balancing_loss  # noqa: E402
from series import SeriesConfig, plan_series  # noqa: E402
from test_grow import blocks_equal, cfg, make_model, tiny_checkpoint  # noqa: E402
from test_train import run_args, train_losses  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # small models: a second thread only waits on a shared machine
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread in this module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def moe(config, experts=4, top_k=2):
    return replace(config, moe_experts=experts, moe_top_k=top_k)


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)


def rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


# -----------------------------------------------------------------------------
# the layer against transformers' Mixtral and against the definition


MIXTRAL_CASES = [  # (tied, KV heads, query heads per KV head, experts, top-k)
    (False, 1, 2, 2, 1), (True, 2, 1, 4, 2), (False, 2, 2, 4, 1), (True, 1, 3, 2, 2)]


@pytest.mark.parametrize("case", range(len(MIXTRAL_CASES)))
def test_logits_aux_and_loss_match_transformers_mixtral(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    tied, n_kv, group, E, k = MIXTRAL_CASES[case]
    rng, gen = random.Random(case), torch.Generator().manual_seed(case)
    config = ModelConfig(vocab_size=rng.choice([262, 320]), d_model=n_kv * group * rng.choice([8, 12]),
                         n_layers=rng.choice([1, 2]), n_heads=n_kv * group, n_kv_heads=n_kv, head_dim=rng.choice([8, 16]),
                         ffn_dim=rng.choice([24, 40]), max_seq_len=64, rope_theta=rng.choice([1e4, 5e5]),
                         norm_eps=rng.choice([1e-5, 1e-6]), tie_embeddings=tied, moe_experts=E, moe_top_k=k,
                         moe_aux_coef=rng.choice([0.01, 0.02]))
    model = make_model(config, seed=case, dtype=torch.float32).eval()  # unit-scale routers: routing is not uniform
    export_hf(model, tmp_path / "hf", tokenizer={"name": "bytes", "vocab_size": config.vocab_size})
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["architectures"] == ["MixtralForCausalLM"] and written["sliding_window"] is None
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert (hf.config.num_local_experts, hf.config.num_experts_per_tok, hf.config.tie_word_embeddings) == (E, k, tied)
    assert hf.config.router_aux_loss_coef == config.moe_aux_coef
    idx = torch.randint(0, config.vocab_size, (3, 29), generator=gen)
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx, output_router_logits=True)
    assert (ours - theirs.logits).abs().max().item() < 1e-4, config
    assert abs(model.aux_loss.item() - theirs.aux_loss.item()) < 1e-5
    assert model.expert_counts.shape == (config.n_layers, E) and (model.expert_counts.sum(1) == 3 * 29 * k).all()
    # the training loss: cross-entropy + coef * aux, as Mixtral's with labels (which it shifts itself) ...
    targets = torch.cat([idx[:, 1:], torch.full((3, 1), -1)], 1)
    model.train(), hf.train()
    with torch.no_grad():
        loss = model(idx, targets)[1].item()
        assert abs(loss - hf(idx, labels=idx, output_router_logits=True).loss.item()) < 1e-5
        # ... and in eval mode the cross-entropy alone (validation), which is computed here from the logits
        model.eval()
        logits, ce = model(idx, targets)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1).item()
    assert abs(ce.item() - expected) < 1e-6 and abs(loss - expected - config.moe_aux_coef * model.aux_loss.item()) < 1e-5
    # import-hf gives the same model back
    again, tok = import_hf(tmp_path / "hf")
    assert asdict(again.config) == asdict(config) and tok["name"] == "bytes"
    with torch.no_grad():
        assert torch.equal(again.eval()(idx)[0], ours)


def test_aux_loss_closed_forms():
    # balance: every expert chosen k N / E times, every mean router probability 1/E: E * E (k/E)(1/E) = k
    for E, k in ((2, 1), (4, 2), (8, 2), (3, 3)):
        N = 12 * E
        stats = [(torch.full((E,), k * N // E), torch.full((E,), N / E, dtype=torch.float64))] * 3
        assert load_balancing_loss(stats, E, N).item() == pytest.approx(k, abs=1e-12)
    # collapse: top-1, every token on expert 0 with probability 1: E
    stats = [(torch.tensor([10, 0, 0, 0]), torch.tensor([10.0, 0, 0, 0], dtype=torch.float64))]
    assert load_balancing_loss(stats, 4, 10).item() == pytest.approx(4.0)


def reference_moe(layer, x):
    """The definition, one token at a time: softmax, top-k, weights renormalized, the chosen experts summed."""
    out, chosen = [], []
    for h in x.reshape(-1, x.shape[-1]):
        w, e = torch.softmax(layer.gate(h), -1).topk(layer.top_k)
        w = w / w.sum()
        out.append(sum(w[j] * layer.experts[int(e[j])](h[None])[0] for j in range(layer.top_k)))
        chosen += e.tolist()
    return torch.stack(out).view(x.shape), torch.bincount(torch.tensor(chosen), minlength=len(layer.experts))


@pytest.mark.parametrize("experts,top_k", [(4, 2), (3, 1), (5, 3)])
def test_grouped_dispatch_equals_a_loop_over_tokens(experts, top_k):
    torch.manual_seed(experts)
    layer = SparseMoE(ModelConfig(d_model=16, ffn_dim=24, n_heads=2, n_kv_heads=2, moe_experts=experts,
                                  moe_top_k=top_k)).double()
    with torch.no_grad():
        layer.gate.weight.normal_()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref, counts = reference_moe(layer, x)
    assert (y - ref).abs().max().item() < 1e-12 and torch.equal(layer.routing[0], counts)
    g = torch.randn_like(y)
    params = [x, *layer.parameters()]
    ours = torch.autograd.grad((y * g).sum(), params)
    theirs = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)  # unchosen experts: None
    for a, b in zip(ours, theirs):
        assert (a - (torch.zeros_like(a) if b is None else b)).abs().max().item() < 1e-12


def test_an_expert_without_tokens_still_gets_a_gradient():
    # DDP needs every parameter in the graph: an expert with an empty slice runs on it and gets zeros
    layer = SparseMoE(ModelConfig(d_model=8, ffn_dim=16, n_heads=2, n_kv_heads=2, moe_experts=3, moe_top_k=1))
    with torch.no_grad():
        layer.gate.weight.copy_(torch.tensor([[1.0] * 8, [-1.0] * 8, [-1.0] * 8]))  # positive inputs: expert 0
    layer(torch.rand(2, 5, 8) + 0.1).square().sum().backward()
    assert layer.routing[0].tolist() == [10, 0, 0]
    assert all(p.grad is not None and p.grad.any() for p in layer.experts[0].parameters())
    assert all(p.grad is not None and not p.grad.any() for e in (1, 2) for p in layer.experts[e].parameters())


def test_total_and_active_counts_and_flops():
    c = config_from_shape("cpu-4", moe_experts=8, moe_top_k=2)
    with torch.device("meta"):
        m, dense = Llama(c), Llama(config_from_shape("cpu-4"))
    d, f, L, E = 128, 384, 4, 8
    shared = L * (4 * d * d + 2 * d) + d  # attention, the two norms per layer, the final norm
    assert dense.num_params(True) == dense.num_params(True, active=True) == shared + L * 3 * d * f
    assert m.num_params(True) == shared + L * (E * d + E * 3 * d * f)  # routers and all experts
    active = shared + L * (E * d + 2 * 3 * d * f)  # routers and the top-2
    assert m.num_params(True, active=True) == active and m.num_params(False) == m.num_params(True) + 2 * 320 * d
    assert m.flops_per_token(with_attention=False) == 6 * active
    assert m.flops_per_token(256) == 6 * (active + 320 * d) + 12 * L * d * 256


def test_cached_generation_of_a_mixture_of_experts():
    model = make_model(moe(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                       max_seq_len=48)), dtype=torch.float32).eval()
    prompt = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate(prompt, 20, temperature=0), model.generate(prompt, 20, temperature=0, use_cache=False))


def test_configs_from_before_the_moe_fields_are_dense():
    config = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
    old = {k: v for k, v in asdict(config).items() if not k.startswith("moe_")}
    assert config_from_dict(old) == config and config.moe_experts == 0
    model = Llama(config)
    assert not any("block_sparse_moe" in k for k in model.state_dict())
    again = model_from_checkpoint({"model": model.state_dict(), "model_config": old})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    for bad, words in ((dict(moe_experts=2, moe_top_k=3), "moe_top_k=3"), (dict(moe_experts=-1), "moe_experts=-1"),
                       (dict(moe_experts=2, moe_aux_coef=math.nan), "moe_aux_coef")):
        with pytest.raises(ValueError, match=words):
            ModelConfig(**bad)


# -----------------------------------------------------------------------------
# upcycling (grow.py, U)


UPCYCLE_CASES = [
    (cfg(24, 3, 3, 40, 2), moe(cfg(24, 3, 3, 40, 2))),  # the same shape: only the experts are new
    (cfg(24, 3, 3, 40, 2, tied=True), moe(cfg(40, 5, 5, 70, 3, tied=True), 2, 1)),  # wider and deeper, tied, top-1
    (cfg(32, 4, 2, 40, 2), moe(cfg(48, 6, 3, 60, 4), 4, 3)),  # GQA, top-3
    (moe(cfg(24, 3, 3, 40, 2)), moe(cfg(40, 5, 5, 70, 3))),  # a mixture of experts into a wider, deeper one
]


@pytest.mark.parametrize("case", range(len(UPCYCLE_CASES)))
def test_upcycling_computes_the_same_function(case):
    src, tgt = UPCYCLE_CASES[case]
    model = make_model(src, seed=case)  # float64, unit-scale weights and routers
    idx = torch.randint(0, src.vocab_size, (2, 24), generator=torch.Generator().manual_seed(case))
    widened = (tgt.d_model, tgt.ffn_dim) != (src.d_model, src.ffn_dim)
    for noise in (0.0, 1e-3):
        new = grow(model, tgt, seed=case, noise=noise)
        assert (new.config.moe_experts, new.config.moe_top_k) == (tgt.moe_experts, tgt.moe_top_k)
        assert function_gap(model, new, idx) < 1e-10, (src, tgt, noise)
        assert (new.expert_counts > 0).sum(1).max() > tgt.moe_top_k  # routing depends on the token
        for block in new.layers:
            experts = block.block_sparse_moe.experts
            same = all(blocks_equal(experts[0], e) for e in experts[1:])
            # from a dense source the experts are copies; the noise tells them apart where units were copied
            assert same == (not src.moe_experts and not (noise and widened))


def test_routing_breaks_the_symmetry_of_copied_experts():
    model = make_model(cfg(24, 3, 3, 40, 2))
    new = grow(model, moe(cfg(24, 3, 3, 40, 2)), noise=0.0)
    experts = new.layers[0].block_sparse_moe.experts
    assert all(blocks_equal(experts[0], e) for e in experts)
    gen = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 61, (4, 24), generator=gen), torch.randint(0, 61, (4, 24), generator=gen)
    router = new.layers[0].block_sparse_moe.gate.weight
    # cross-entropy alone (eval mode): identical experts give the output whatever the router says, so the
    # router gets no gradient from it; the experts do, each from its own tokens, so they differ
    new.eval()
    new(idx, targets)[1].backward()
    assert router.grad.abs().max().item() < 1e-12
    grads = [torch.cat([p.grad.flatten() for p in e.parameters()]) for e in experts]
    assert min((grads[i] - grads[j]).abs().max().item() for i in range(4) for j in range(i)) > 1e-6
    # the training loss adds the load-balancing loss, which trains the router from the first step
    new.zero_grad()
    new.train()
    new(idx, targets)[1].backward()
    assert router.grad.abs().max().item() > 1e-6


def test_growth_of_a_mixture_keeps_its_experts():
    model = make_model(moe(cfg(24, 3, 3, 40, 2)))
    for target in (cfg(24, 3, 3, 40, 2), moe(cfg(24, 3, 3, 40, 2), 8, 2), moe(cfg(24, 3, 3, 40, 2), 4, 1)):
        with pytest.raises(ValueError, match="same moe_experts=4 and moe_top_k=2"):
            grow(model, target)


def test_cli_upcycles_and_prints_the_counts(tmp_path):
    tiny_checkpoint(tmp_path / "a.pt")  # d_model 32, 2 heads of 16, FFN 64, 2 layers
    spec = "d_model=48,n_heads=3,n_kv_heads=3,ffn_dim=96,n_layers=3,moe_experts=4,moe_top_k=2"
    r = run("grow_cli.py", str(tmp_path / "a.pt"), "--to", spec, "--out", str(tmp_path / "b.pt"))
    assert r.returncode == 0, r.stderr
    grown = model_from_checkpoint(load_checkpoint(tmp_path / "b.pt"))
    assert (grown.config.moe_experts, grown.config.moe_top_k) == (4, 2)
    line = [l for l in r.stdout.splitlines() if l.startswith("grown")][0]
    assert "experts=4 top_k=2" in line
    assert f"non-embedding {grown.num_params(True):,} (active per token {grown.num_params(True, active=True):,})" in line
    assert float(re.search(r"max \|logit difference\| = (\S+)", r.stdout)[1]) < 1e-4  # float32 weights
    for args, words in ((["--to", "moe_experts=4,moe_top_k=5"], "moe_top_k=5"), (["--to", "moe_experts=2"], "a mixture")):
        path = tmp_path / ("b.pt" if words == "a mixture" else "a.pt")
        r = run("grow_cli.py", str(path), *args, "--out", str(tmp_path / "c.pt"))
        err = r.stderr.strip()
        assert r.returncode == 2 and err.startswith("error: ") and "\n" not in err and words in err, r.stderr


# -----------------------------------------------------------------------------
# training: train.py and series.py


def test_moe_run_logs_aux_loss_and_resumes_bit_for_bit(tmp_path, data_dir):
    # bit for bit on the CPU, as here; on CUDA only with deterministic=true (README), unchecked without a GPU
    args = lambda out: run_args(out, data_dir, moe_experts=4, moe_top_k=2, max_steps=12, ckpt_interval=4,  # noqa: E731
                                eval_interval=6)
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = run("train.py", *args(full))
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([sys.executable, "train.py", *args(killed)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").exists() and max(train_losses(killed) or [0]) >= 7:  # after the step-4 checkpoint
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    r = run("train.py", *args(killed), "--resume")
    assert r.returncode == 0, r.stderr
    aux = lambda out: {m["step"]: m["aux_loss"] for m in rows(out) if "loss" in m}  # noqa: E731
    assert train_losses(killed) == train_losses(full) and aux(killed) == aux(full) and sorted(aux(full)) == list(range(1, 13))
    assert all(1.0 < a < 4.0 for a in aux(full).values())  # top-2 of 4: 2 at balance, 4 at collapse
    a, b = load_checkpoint(full / "final.pt"), load_checkpoint(killed / "final.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    model = model_from_checkpoint(a).eval()
    assert model.config.moe_experts == 4 and a["flops"] == 6 * model.num_params(True, active=True) * a["tokens"]
    # validation reports the cross-entropy alone: recomputed here from the logits of the final model
    total = n = 0
    for x, y in data.val_batches(os.path.join(data_dir, "default-bytes"), 4, 64, 2):
        with torch.no_grad():
            logits = model(x)[0]
        total, n = total + F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item(), n + y.numel()
    assert abs([m["val_loss"] for m in rows(full) if "val_loss" in m][-1] - total / n) < 1e-5


def test_a_run_checkpointed_before_the_moe_fields_resumes(tmp_path, data_dir):
    out = tmp_path / "old"
    r = run("train.py", *run_args(out, data_dir, max_steps=2, ckpt_interval=2, eval_interval=2))
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(out / "ckpt_0000002.pt")
    ckpt["model_config"] = {k: v for k, v in ckpt["model_config"].items() if not k.startswith("moe_")}
    save_checkpoint(ckpt, out / "ckpt_0000002.pt")  # as nanogrow wrote it before this change
    r = run("train.py", *run_args(out, data_dir, max_steps=4, ckpt_interval=2, eval_interval=2), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed at step 2" in r.stdout and load_checkpoint(out / "final.pt")["step"] == 4


def idle_expert_checkpoint(path):
    """cpu-1 upcycled into 4 experts, top-1, every router zero: all probabilities tie, so every token of the
    first step goes to one expert and the other three get none."""
    torch.manual_seed(0)
    dense = Llama(config_from_shape("cpu-1", max_seq_len=64))
    model = grow(dense, config_from_shape("cpu-1", max_seq_len=64, moe_experts=4, moe_top_k=1), noise=0.0)
    with torch.no_grad():
        for block in model.layers:
            block.block_sparse_moe.gate.weight.zero_()
        model(torch.randint(0, 320, (4, 64)))
    assert (model.expert_counts == 0).sum() == 3 * model.config.n_layers
    save_checkpoint(make_checkpoint(model.state_dict(), model.config, {"name": "bytes", "vocab_size": 320}, Lineage()), path)


def test_moe_ddp_and_fsdp_with_idle_experts_match_one_process(tmp_path, data_dir):
    # one process with grad_accum=2 reads the rows that 2 ranks with grad_accum=1 read (tests/test_train.py)
    idle_expert_checkpoint(tmp_path / "init.pt")
    common = dict(max_steps=4, ckpt_interval=100, eval_interval=4, init_from=tmp_path / "init.pt")
    r = run("train.py", *run_args(tmp_path / "single", data_dir, grad_accum=2, **common))
    assert r.returncode == 0, r.stderr
    aux = lambda out: [m["aux_loss"] for m in rows(out) if "loss" in m]  # noqa: E731
    # step 1: uniform router probabilities, every token on one expert: E * (1 * 1/E) = 1
    assert aux(tmp_path / "single")[0] == pytest.approx(1.0)
    for parallel in ("ddp", "fsdp"):  # DDP: idle experts get zero gradients; FSDP: routing read from every block
        r = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                *run_args(tmp_path / parallel, data_dir, grad_accum=1, parallel=parallel, **common))
        assert r.returncode == 0, r.stderr[-2000:]
        a, b = train_losses(tmp_path / "single"), train_losses(tmp_path / parallel)
        assert sorted(a) == sorted(b) == [1, 2, 3, 4] and max(abs(a[s] - b[s]) for s in a) < 1e-5, parallel
        assert max(abs(x - y) for x, y in zip(aux(tmp_path / "single"), aux(tmp_path / parallel))) < 1e-5, parallel


SERIES = """
# written for grow_schedule "continue" (one schedule over the series), whatever series.py's default
grow_schedule = "continue"
tokenizer = "bytes"
batch_size = 4
seq_len = 64
max_data_tokens = 300_000
warmup_steps = 2
grow_warmup_steps = 2
eval_interval = 1000
eval_batches = 2
log_interval = 1
ckpt_interval = 1000
plot = False
"""


def test_a_series_stage_may_upcycle_budgeted_by_active_parameters(tmp_path):
    path = tmp_path / "s.py"
    path.write_text(SERIES + f"out_dir = {str(tmp_path / 'out')!r}\ntokens_per_param = 2\nstages = ["
                    "dict(name='a', shape='cpu-1', lr=3e-3), dict(name='b', shape='cpu-1', moe_experts=4, lr=2e-3)]\n")
    plan, _ = plan_series(configure(SeriesConfig, [str(path)]))
    with torch.device("meta"):
        upcycled = Llama(plan[1].config)
    assert plan[1].config.moe_experts == 4 and plan[1].params == upcycled.num_params(True, active=True) > plan[0].params
    X0, X1 = plan[0].params, plan[1].params
    assert plan[1].staged_tokens == (6 * X1 * round(2 * X1) - 6 * X0 * round(2 * X0)) // (6 * X1)


def test_branch_series_continues_one_checkpoint_dense_and_upcycled_at_equal_flops(tmp_path, data_dir):
    r = run("train.py", *run_args(tmp_path / "init", data_dir, max_steps=6, eval_interval=6))
    assert r.returncode == 0, r.stderr
    init = load_checkpoint(tmp_path / "init" / "final.pt")
    path = tmp_path / "branch.py"
    path.write_text(SERIES + f"out_dir = {str(tmp_path / 'out')!r}\ndata_dir = {data_dir!r}\n"
                    f"init_from = {str(tmp_path / 'init' / 'final.pt')!r}\nseries_mode = 'branch'\nbranch_flops = 1e10\n"
                    "stages = [dict(name='dense', shape='cpu-1', lr=1e-3), "
                    "dict(name='4x top-2', shape='cpu-1', moe_experts=4, moe_top_k=2, lr=1e-3)]\n")
    r = run("series.py", str(path))
    assert r.returncode == 0, r.stderr
    series = json.load(open(tmp_path / "out" / "series.json"))
    runs = {r["stage"]: r for r in series["runs"]}
    assert [r["mode"] for r in series["runs"]] == ["branch", "branch"]
    for r in runs.values():  # each spent branch_flops (to one step of 256 tokens) on top of the init's
        assert abs(r["flops"] - init["flops"] - 1e10) <= 6 * r["params"] * 256
        assert r["tokens"] == math.ceil(round(1e10 / (6 * r["params"])) / 256) * 256
    assert runs["4x top-2"]["tokens"] < runs["dense"]["tokens"]  # two experts' compute per token
    # both start from the init's function (the upcycled one exactly), on the same validation batches
    first = lambda r: [m["val_loss"] for m in rows(tmp_path / "out" / os.path.dirname(r["metrics"])) if "val_loss" in m][0]  # noqa: E731
    assert abs(first(runs["dense"]) - init["val"]["val_loss"]) < 1e-5
    assert abs(first(runs["4x top-2"]) - init["val"]["val_loss"]) < 1e-5
    moe_ckpt = load_checkpoint(tmp_path / "out" / runs["4x top-2"]["ckpt"])
    assert moe_ckpt["model_config"]["moe_experts"] == 4 and moe_ckpt["history"][-1]["op"] == "grow"
    # both read on from where the init's run stopped
    assert moe_ckpt["train_config"]["data_step_offset"] == init["data_state"]["step"] == 6
    assert (tmp_path / "out" / "series.png").exists() and "Continued from init_from" in (tmp_path / "out" / "report.md").read_text()
