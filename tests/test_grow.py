"""grow.py: function preservation measured over random shapes (non-integer ratios, GQA, tied and untied
embeddings, noise on and off), layer order of every depth operator, symmetry breaking, errors, CLI."""

import math
import os
import random
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from grow import depth_plan, function_gap, grow, grow_checkpoint, main  # noqa: E402
from model import Llama, ModelConfig, load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402

GAPS = {}  # largest gap seen per check, printed by test_zz_report (pytest -s)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # thousands of tiny ops: a second thread only waits, and on a shared 2-core machine it makes them 10x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cfg(d, heads, kv, ffn, layers, hd=8, vocab=61, tied=False, seq=32):
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, head_dim=hd,
                       ffn_dim=ffn, max_seq_len=seq, tie_embeddings=tied, norm_eps=1e-5)


def make_model(config, seed=0, dtype=torch.float64):
    # random weights of unit-scale activations and random RMSNorm gains (not all ones), so that a wrong
    # scale or a wrong index cannot hide behind the tiny default init
    torch.manual_seed(seed)
    m = Llama(config)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
            else:
                p.copy_(1 + 0.5 * torch.randn(p.shape))
    return m.to(dtype)


def random_case(rng):
    hd, kv, group = rng.choice([4, 8]), rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
    kv2 = kv + rng.choice([0, 1, kv, 2 * kv + 1])
    group2 = math.ceil(group / (kv2 // kv)) + rng.choice([0, 0, 1, 2])  # the GQA constraint, with some slack
    d, ffn, layers = rng.choice([16, 24]), rng.choice([20, 40]), rng.choice([1, 2, 3])
    tied, vocab = rng.random() < 0.5, rng.choice([61, 97])
    src = cfg(d, kv * group, kv, ffn, layers, hd, vocab, tied)
    tgt = cfg(d + rng.choice([0, 1, 8, 17, d + 5]), kv2 * group2, kv2, ffn + rng.choice([0, 3, 30, 2 * ffn + 1]),
              layers + rng.choice([0, 1, 2, layers + 1]), hd, vocab, tied, seq=64)
    return src, tgt


CASES = [
    (cfg(24, 3, 3, 40, 2), cfg(40, 5, 5, 70, 3)),  # the brief's non-integer case
    (cfg(24, 3, 3, 40, 2, tied=True), cfg(40, 5, 5, 70, 3, tied=True)),
    (cfg(32, 4, 2, 40, 2), cfg(48, 6, 3, 60, 4)),  # GQA, both grow
    (cfg(16, 4, 1, 20, 1), cfg(20, 4, 2, 20, 2)),  # GQA: one group of 4 split over two KV copies
    (cfg(16, 2, 2, 20, 2, tied=True), cfg(24, 6, 3, 33, 3, tied=True)),  # MHA -> GQA
    (cfg(16, 2, 2, 20, 1), cfg(50, 7, 7, 70, 4)),  # ratios above 3: several copy rounds
] + [random_case(random.Random(i)) for i in range(10)]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_fpi_zero_preserves_the_function(case):
    src_cfg, tgt_cfg = CASES[case]
    gen = torch.Generator().manual_seed(case)
    idx = torch.randint(0, src_cfg.vocab_size, (2, 24), generator=gen)
    targets = torch.randint(0, src_cfg.vocab_size, (2, 24), generator=gen)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        model = make_model(src_cfg, seed=case, dtype=dtype)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for noise in (0.0, 1e-3, 0.1):  # 0.1: big noise, still cancels exactly
            new = grow(model, tgt_cfg, width="fpi", depth="zero", seed=case, noise=noise)
            assert asdict(new.config) == {**asdict(tgt_cfg), "norm_eps": 1e-5 * src_cfg.d_model / tgt_cfg.d_model}
            assert next(new.parameters()).dtype == dtype
            assert (new.lm_head.weight is new.embed_tokens.weight) == tgt_cfg.tie_embeddings
            gap = function_gap(model, new, idx, dtype=dtype)
            GAPS[str(dtype)] = max(GAPS.get(str(dtype), 0), gap)
            assert gap < tol, (src_cfg, tgt_cfg, noise, gap)
            if dtype == torch.float64:
                with torch.no_grad():
                    loss_a, loss_b = model(idx, targets)[1].item(), new(idx, targets)[1].item()
                assert abs(loss_a - loss_b) < 1e-10
                GAPS["loss"] = max(GAPS.get("loss", 0), abs(loss_a - loss_b))
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # source untouched


def test_function_gap_leaves_models_alone():
    a, b = make_model(CASES[0][0], dtype=torch.float32), make_model(CASES[0][0], seed=1, dtype=torch.float32)
    idx = torch.randint(0, 61, (1, 8))
    assert function_gap(a, a, idx) == 0.0 and function_gap(a, b, idx) > 0
    assert next(a.parameters()).dtype == torch.float32 and next(b.parameters()).dtype == torch.float32


def blocks_equal(x, y):
    return all(torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters()))


@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_depth_layer_order(noise):
    src_cfg = cfg(24, 3, 3, 40, 4)
    model = make_model(src_cfg)
    wide = cfg(40, 5, 5, 70, 4)
    width_only = grow(model, wide, noise=noise)  # the widened layers, same random stream
    idx = torch.randint(0, 61, (2, 16))
    # stack: new layer L+j copies layer j (mod L)
    stacked = grow(model, cfg(40, 5, 5, 70, 7), depth="stack", noise=noise)
    assert [s for s, _ in depth_plan(4, 7, "stack")] == [0, 1, 2, 3, 0, 1, 2]
    for j in range(3):
        assert blocks_equal(stacked.layers[4 + j], stacked.layers[j])
    # dus (SOLAR): layers 0..L-m-1 then m..L-1; m = 1 for 4 -> 6
    dus = grow(model, cfg(40, 5, 5, 70, 6), depth="dus", noise=noise)
    plan = [s for s, _ in depth_plan(4, 6, "dus")]
    assert plan == [0, 1, 2, 1, 2, 3] == [s for s, _ in depth_plan(4, 6, "dus", dus_overlap=1)]
    assert [s for s, _ in depth_plan(32, 48, "dus")] == list(range(24)) + list(range(8, 32))  # SOLAR 10.7B
    for t, s in enumerate(plan):
        assert blocks_equal(dus.layers[t], width_only.layers[s])
    for t, s in enumerate([s for s, _ in depth_plan(4, 7, "stack")]):
        assert blocks_equal(stacked.layers[t], width_only.layers[s])
    # zero: inserted layers copy the layer below, output projections zero (or zero-sum noise)
    zero = grow(model, cfg(40, 5, 5, 70, 6), depth="zero", noise=noise)
    plan = depth_plan(4, 6, "zero")
    assert plan == [(0, False), (0, True), (1, False), (2, False), (2, True), (3, False)]
    for t, (s, z) in enumerate(plan):
        for (name, p), q in zip(zero.layers[t].named_parameters(), width_only.layers[s].parameters()):
            if z and name.endswith(("o_proj.weight", "down_proj.weight")):
                assert torch.equal(p, torch.zeros_like(p)) == (noise == 0)
                assert p.abs().max() < 1e-2  # only the small paired noise
            else:
                assert torch.equal(p, q), name
    assert function_gap(model, zero, idx) < 1e-10
    assert function_gap(model, stacked, idx) > 1e-3 and function_gap(model, dus, idx) > 1e-3


def test_aki_takes_new_units_from_the_layer_above():
    src_cfg, tgt_cfg = cfg(24, 3, 3, 40, 3), cfg(40, 5, 5, 70, 3)
    model = make_model(src_cfg)
    fpi, aki = grow(model, tgt_cfg, width="fpi", noise=0), grow(model, tgt_cfg, width="aki", noise=0)
    assert [p.shape for p in aki.parameters()] == [p.shape for p in fpi.parameters()]
    for l in range(2):  # old neurons/heads as fpi, new ones from layer l+1; out-weights split as fpi
        for name in ("gate_proj", "up_proj"):
            a, f0, f1 = (getattr(m.layers[i].mlp, name).weight for m, i in ((aki, l), (fpi, l), (fpi, l + 1)))
            assert torch.equal(a[:40], f0[:40]) and torch.equal(a[40:], f1[40:])
        a, f0, f1 = aki.layers[l].self_attn.q_proj.weight, fpi.layers[l].self_attn.q_proj.weight, fpi.layers[l + 1].self_attn.q_proj.weight
        assert torch.equal(a[:24], f0[:24]) and torch.equal(a[24:], f1[24:])
        assert torch.equal(aki.layers[l].mlp.down_proj.weight, fpi.layers[l].mlp.down_proj.weight)
    assert blocks_equal(aki.layers[2], fpi.layers[2])  # the top layer has no layer above: its own (fpi)
    assert function_gap(model, aki, torch.randint(0, 61, (2, 16))) > 1e-3  # not function preserving


def sgd_step(model, idx, targets, lr=0.1):
    model.zero_grad()
    model(idx, targets)[1].backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def test_noise_breaks_symmetry_and_training_goes_on():
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 61, (4, 24)), torch.randint(0, 61, (4, 24))
    # width without residual growth: duplicated FFN neurons start with equal gate rows
    model = make_model(cfg(24, 3, 3, 40, 2))
    tgt = cfg(24, 3, 3, 60, 2)
    for noise in (0.0, 1e-3):
        new = grow(model, tgt, noise=noise, seed=1)
        gate = lambda: new.layers[0].mlp.gate_proj.weight  # noqa: E731
        copies = [(n, j) for n in range(40, 60) for j in range(40) if torch.equal(gate()[n], gate()[j])]
        assert len(copies) == 20  # every new neuron is an exact copy of one old neuron
        sgd_step(new, idx, targets)
        diff = max((gate()[n] - gate()[j]).abs().max().item() for n, j in copies)
        if noise == 0:
            assert diff < 1e-12  # exact copies get equal gradients: they would stay copies forever
        else:
            assert diff > 1e-7  # paired noise on down_proj columns gives them different gradients
    # residual growth: copies of a residual dim (embedding columns) start equal, then diverge
    model = make_model(cfg(24, 3, 3, 40, 2, tied=True))
    new = grow(model, cfg(40, 5, 5, 70, 3, tied=True), seed=2)
    emb = new.embed_tokens.weight
    pairs = [(i, j) for i in range(24, 40) for j in range(24) if torch.equal(emb[:, i], emb[:, j])]
    assert len(pairs) == 16
    opt = torch.optim.AdamW(new.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = new(idx, targets)[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min((emb[:, i] - emb[:, j]).abs().max().item() for i, j in pairs) > 1e-6
    assert losses[-1] < losses[0]


def test_bad_targets_say_what_to_do():
    model = make_model(cfg(24, 3, 3, 40, 4), dtype=torch.float32)
    bad = [
        (cfg(16, 3, 3, 40, 4), "d_model=16 is smaller"),
        (cfg(24, 3, 3, 40, 3), "n_layers=3 is smaller"),
        (cfg(32, 4, 4, 40, 4, hd=4), "head_dim"),
        (cfg(24, 3, 3, 40, 4, vocab=97), "vocab_size"),
        (cfg(24, 3, 3, 40, 4, tied=True), "tie_embeddings"),
        (replace(cfg(24, 3, 3, 40, 4), rope_theta=5e5), "rope_theta"),
    ]
    for target, words in bad:
        with pytest.raises(ValueError, match=words):
            grow(model, target)
    for layers in (7, 10):  # odd, and beyond 2L
        with pytest.raises(ValueError, match="dus"):
            grow(model, cfg(24, 3, 3, 40, layers), depth="dus")
    with pytest.raises(ValueError, match="dus_overlap=2"):
        grow(model, cfg(24, 3, 3, 40, 6), depth="dus", dus_overlap=2)
    with pytest.raises(ValueError, match="only for depth 'dus'"):
        grow(model, cfg(24, 3, 3, 40, 6), depth="zero", dus_overlap=1)
    with pytest.raises(ValueError, match="GQA"):  # 2 KV groups of 4 cannot become 3 groups of 3
        grow(make_model(cfg(32, 8, 2, 40, 1)), cfg(32, 9, 3, 40, 1))
    with pytest.raises(ValueError, match="width"):
        grow(model, cfg(24, 3, 3, 40, 4), width="net2net")


def tiny_checkpoint(path):
    config = cfg(32, 2, 2, 64, 2, hd=16, vocab=320, seq=64)
    model = make_model(config, dtype=torch.float32)
    save_checkpoint(dict(model=model.state_dict(), model_config=asdict(config), tokenizer={"name": "bytes", "vocab_size": 320},
                         flops=1.5e12, tokens=12345, history=[], stage="s1", optimizer={"state": {}}), path)
    return model


def test_grow_checkpoint_and_cli(tmp_path, capsys):
    src = tiny_checkpoint(tmp_path / "a.pt")
    ckpt = load_checkpoint(tmp_path / "a.pt")
    new_ckpt, gap = grow_checkpoint(ckpt, cfg(48, 3, 3, 96, 3, hd=16, vocab=320, seq=128), seed=3)
    # float32 weights evaluated in float64: the gap is the float32 rounding of the scaled copies, ~1e-6
    assert gap < 1e-4 and "optimizer" not in new_ckpt and new_ckpt["stage"] == "s1"
    assert (new_ckpt["flops"], new_ckpt["tokens"], new_ckpt["tokenizer"]["name"]) == (1.5e12, 12345, "bytes")
    rec = new_ckpt["history"][-1]
    assert rec["op"] == "grow" and rec["from"]["d_model"] == 32 and rec["to"]["d_model"] == 48 and rec["gap"] == gap

    out = tmp_path / "b.pt"
    r = subprocess.run([sys.executable, "grow.py", str(tmp_path / "a.pt"), "--to", "d_model=48,n_heads=3,n_kv_heads=3,ffn_dim=96,n_layers=3",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("non-embedding") == 2 and "function gap" in r.stdout
    grown = model_from_checkpoint(load_checkpoint(out, tokenizer="bytes"))
    assert grown.config.d_model == 48 and grown.config.norm_eps == pytest.approx(1e-5 * 32 / 48)
    assert function_gap(src, grown, torch.randint(0, 320, (2, 32))) < 1e-4

    main([str(tmp_path / "a.pt"), "--to", "n_layers=4", "--depth", "dus", "--out", str(tmp_path / "c.pt")])
    assert "not function preserving" in capsys.readouterr().out

    with pytest.raises(SystemExit) as e:  # error path in-process: one line, exit code 2
        main([str(tmp_path / "a.pt"), "--to", "d_model=16", "--out", str(tmp_path / "d.pt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    r = subprocess.run([sys.executable, "grow.py", str(tmp_path / "missing.pt"), "--to", "cpu-2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and r.stderr.startswith("error: no checkpoint") and "Traceback" not in r.stderr


def test_zz_report():
    print(f"\nlargest gaps over the fpi+zero cases: {GAPS}")
