"""The growth recipe beyond the weights: AdamW's state through growth (grow.py rule A) checked against the grown
model's own gradients in float64 and against one optimizer step, the post-growth schedule (common.lr_at's span,
series.py grow_schedule "continue"), AKI under GQA, the depth orders of bert2BERT and LLaMA-Pro, growth of a
bfloat16 model rounded once, and the grown model's RoPE tables."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import grow  # noqa: E402
import grow_cli  # noqa: E402
import series  # noqa: E402
from checkpoint import Lineage, load_checkpoint, make_checkpoint, save_checkpoint  # noqa: E402
from common import ConfigError, configure, decay_groups, lr_at, make_optimizer  # noqa: E402
from model import Llama, ModelConfig, rope_cos_sin  # noqa: E402
from parallel import load_optimizer_state  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def cfg(d, heads, kv, ffn, layers, tied=False, experts=0, hd=4, vocab=37):
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, head_dim=hd,
                       ffn_dim=ffn, max_seq_len=16, tie_embeddings=tied, moe_experts=experts, moe_top_k=1)


def make_model(config, seed=0, dtype=torch.float64):
    """Unit-scale random weights and gains far from 1, so that a wrong scale cannot hide in a tiny init."""
    torch.manual_seed(seed)
    m = Llama(config)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[1]) if p.dim() == 2 else 1 + 0.5 * torch.randn(p.shape))
    return m.to(dtype)


def batch(config, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (2, 12), generator=gen) for _ in range(2)]


def gradients(model, idx, targets):
    model.zero_grad()
    model(idx, targets)[1].backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def fresh_names(new, plan):
    """Parameters that rule A starts with no history: depth zero's new blocks."""
    return {f"layers.{t}.{n}" for t, (_, z) in enumerate(plan) if z for n, _ in new.layers[t].named_parameters()}


# fpi + depth zero (function preserving) with query heads per KV head unchanged, where rule A is exact
EXACT = [
    (cfg(12, 3, 3, 20, 2), cfg(20, 5, 5, 36, 3)),  # MHA, non-integer ratios
    (cfg(12, 3, 3, 20, 2, tied=True), cfg(20, 5, 5, 36, 3, tied=True)),  # one matrix both writer and reader
    (cfg(16, 4, 2, 24, 2), cfg(24, 8, 4, 40, 4)),  # GQA: 2 KV heads of 2 queries -> 4 of 2
    # a mixture of experts, wider (the same depth: the load-balancing loss averages over layers, so a new layer's
    # routing changes the training loss, though not the logits)
    (cfg(12, 3, 3, 20, 2, experts=2), cfg(16, 4, 4, 28, 2, experts=2)),
]


@pytest.mark.parametrize("case", range(len(EXACT)))
def test_the_grown_models_gradients_are_rule_A(case):
    # the derivation of rule A, measured: at the grown point, every gradient is the source's mapped with 1/(c K)
    src_cfg, tgt_cfg = EXACT[case]
    model = make_model(src_cfg, seed=case)
    idx, targets = batch(src_cfg, case)
    new, maps, plan = grow.grow_with_maps(model, tgt_cfg, seed=case, noise=0.0)
    g_src, g_new = gradients(model, idx, targets), gradients(new, idx, targets)
    predicted = grow.empty_like_config(new.config, torch.float64, "cpu")
    gain = math.sqrt(src_cfg.d_model / tgt_cfg.d_model)
    grow.grow_into(predicted, grow.moment_model(src_cfg, g_src), maps, plan, grow.moment_scales(maps, gain, 1), "fpi",
                   moments=True)
    fresh = fresh_names(new, plan)
    assert bool(fresh) == (tgt_cfg.n_layers > src_cfg.n_layers)  # depth zero's new blocks
    for name, p in predicted.named_parameters():
        if name in fresh and name.endswith(("o_proj.weight", "down_proj.weight")):
            continue  # a new block's output projections: the one gradient rule A does not predict (they start fresh)
        scale = g_new[name].abs().max().item()
        # inside a new block everything else has gradient 0 (its output is zero): the zero moments are exact
        assert (p - g_new[name]).abs().max().item() <= 1e-10 * max(scale, 1e-30), name
        assert scale > 0 or name in fresh, name


def test_one_adamw_step_after_growth_keeps_the_moments_mapped():
    # grow(model, state) then one AdamW step equals one step of the source, then grow: the moments are the
    # running averages of gradients that rule A maps, so they stay mapped step after step
    src_cfg, tgt_cfg = EXACT[2]
    model = make_model(src_cfg, seed=7)
    opt = make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), torch.device("cpu"))
    for s in range(3):
        model(*batch(src_cfg, s))[1].backward()
        opt.step()
        opt.zero_grad()
    new, maps, plan = grow.grow_with_maps(model, tgt_cfg, seed=1, noise=0.0)
    new_opt = make_optimizer(new, 1e-2, 0.1, (0.9, 0.95), torch.device("cpu"))
    load_optimizer_state(new, new_opt, grow.grow_optimizer_state(model, new, opt.state_dict(), maps, plan, "fpi"))
    for m, o in ((model, opt), (new, new_opt)):
        m(*batch(src_cfg, 99))[1].backward()
        o.step()
    expected = grow.grow_optimizer_state(model, new, opt.state_dict(), maps, plan, "fpi")["state"]
    got = new_opt.state_dict()["state"]
    names = [n for g in decay_groups(new) for n in g]
    fresh = fresh_names(new, plan)
    assert len(got) == len(expected) == len(names) and list(expected) == names  # keyed by name, in group order
    for i, name in enumerate(names):
        assert got[i]["step"].item() == (1 if name in fresh else 4), name
        if name in fresh:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            ref = expected[name][key]
            assert (got[i][key] - ref).abs().max().item() <= 1e-10 * ref.abs().max().item(), (name, key)


def test_grown_optimizer_through_checkpoint_cli_and_train(tmp_path, capsys):
    config = cfg(32, 2, 2, 48, 2, hd=16, vocab=320)
    model = make_model(config, dtype=torch.float32)
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    model(*batch(config, 0))[1].backward()
    opt.step()
    save_checkpoint(make_checkpoint(model.state_dict(), config, {"name": "bytes", "vocab_size": 320}, Lineage(),
                                    run_flops=1e9, tokens=100, optimizer=opt.state_dict(),
                                    train_config={"decay_embeddings": False}), tmp_path / "a.pt")
    grow_cli.main([str(tmp_path / "a.pt"), "--to", "d_model=48,n_heads=3,n_kv_heads=3,ffn_dim=64,n_layers=3",
                   "--optimizer", "grown", "--out", str(tmp_path / "b.pt")])
    b = load_checkpoint(tmp_path / "b.pt")
    assert b["history"][-1]["optimizer"] == "grown" and len(b["optimizer"]["state"]) == 3 * 9 + 3
    # train.py starts from it: the run's AdamW holds the grown moments (the step counts go on from 1)
    run = [sys.executable, "train.py", f"--init_from={tmp_path / 'b.pt'}", "--init_optimizer", "--max_steps=2",
           "--batch_size=2", "--seq_len=16", "--eval_interval=2", "--eval_batches=1", "--warmup_steps=0", "--plot=false",
           f"--data_dir={tmp_path / 'data'}"]
    subprocess.run(run + [f"--out_dir={tmp_path / 'run'}"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    steps = [e["step"].item() for e in load_checkpoint(tmp_path / "run" / "final.pt")["optimizer"]["state"].values()]
    assert sorted(set(steps)) == [2, 3]  # a new zero block starts at step 0, the rest go on from the source's 1
    # no optimizer state to take: one line, exit code 2, nothing written
    save_checkpoint(make_checkpoint(model.state_dict(), config, {"name": "bytes", "vocab_size": 320}, Lineage()),
                    tmp_path / "bare.pt")
    with pytest.raises(SystemExit) as e:
        grow_cli.main([str(tmp_path / "bare.pt"), "--to", "d_model=48,n_heads=3,n_kv_heads=3", "--optimizer", "grown",
                       "--out", str(tmp_path / "c.pt")])
    assert e.value.code == 2 and "no optimizer state" in capsys.readouterr().err and not (tmp_path / "c.pt").exists()
    out = subprocess.run(run[:2] + [f"--init_from={tmp_path / 'bare.pt'}"] + run[3:] + [f"--out_dir={tmp_path / 'r2'}"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert out.returncode == 2 and "no optimizer state" in out.stderr and "Traceback" not in out.stderr


def test_grown_optimizer_needs_a_function_preserving_growth(tmp_path, capsys):
    # rule A's premise is the grown point computing the source's function: elsewhere the grown model's own gradients
    # are not the mapped ones (measured, noise 0, 16/4/4 -> 24/6/6, 2 -> 4 layers: the relative error of the
    # predicted gradient is ~1e-15 for fpi + zero or zero_groups, a median of 1.1 (up to 14) for stack, stack_top
    # and dus, 0.97 (up to 1.8) for aki), so a grown AdamW state there would be 8-50x off: refused, in one line
    src_cfg, tgt_cfg = cfg(16, 4, 4, 24, 2), cfg(24, 6, 6, 40, 4)
    model = make_model(src_cfg, dtype=torch.float32)
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    model(*batch(src_cfg, 0))[1].backward()
    opt.step()
    ckpt = make_checkpoint(model.state_dict(), src_cfg, {"name": "bytes", "vocab_size": 37}, Lineage(), run_flops=1e9,
                           tokens=100, optimizer=opt.state_dict(), train_config={"decay_embeddings": False})
    for width, depth in (("fpi", "stack"), ("fpi", "stack_top"), ("fpi", "dus"), ("aki", "zero")):
        with pytest.raises(ConfigError, match=f"width={width} depth={depth}.*--optimizer fresh"):
            grow.grow_checkpoint(ckpt, tgt_cfg, optimizer="grown", width=width, depth=depth)
        grow.grow_checkpoint(ckpt, tgt_cfg, optimizer="fresh", width=width, depth=depth)  # weights alone: fine
    for depth in ("zero", "zero_groups"):
        grown, _ = grow.grow_checkpoint(ckpt, tgt_cfg, optimizer="grown", depth=depth)
        assert len(grown["optimizer"]["state"]) == 4 * 9 + 3
    # stack at the same depth adds no layer and keeps the function: rule A holds
    grow.grow_checkpoint(ckpt, replace(tgt_cfg, n_layers=2), optimizer="grown", depth="stack")
    save_checkpoint(ckpt, tmp_path / "a.pt")
    with pytest.raises(SystemExit) as e:
        grow_cli.main([str(tmp_path / "a.pt"), "--to", "n_layers=4", "--depth", "stack", "--optimizer", "grown",
                       "--out", str(tmp_path / "b.pt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "rule A" in err, err
    assert not (tmp_path / "b.pt").exists()
    with pytest.raises(ConfigError, match="depth=stack"):  # series.py checks its plan with the same rule, up front
        grow.check_growth(src_cfg, tgt_cfg, "fpi", "stack", 1e-3, None, "grown")


def test_schedule_span_is_a_part_of_one_schedule():
    lr, n, ratio = 1e-3, 50, 0.1
    for start, end in ((0.0, 1.0), (0.2, 0.7), (0.5, 1.0)):
        for s in range(n):  # closed form: the cosine at the run's position in the span
            pos = start + (end - start) * s / (n - 1)
            want = lr * ratio + 0.5 * (1 + math.cos(math.pi * pos)) * (lr - lr * ratio)
            assert lr_at(s, n, lr, 0, "cosine", ratio, span=(start, end)) == pytest.approx(want, rel=1e-12)
        # a warmup ramps to the value where the span starts
        top = lr_at(0, n, lr, 0, "cosine", ratio, span=(start, end))
        assert lr_at(4, n, lr, 10, "cosine", ratio, span=(start, end)) == pytest.approx(top * 5 / 10, rel=1e-12)
    # WSD: two halves of a run are the whole run
    whole = [lr_at(s, 2 * n, lr, 0, "wsd", ratio, 0.3) for s in range(2 * n)]
    halves = [lr_at(s, n, lr, 0, "wsd", ratio, 0.3, span=(0.0, 0.5)) for s in range(n)]
    halves += [lr_at(s, n, lr, 0, "wsd", ratio, 0.3, span=(0.5, 1.0)) for s in range(n)]
    assert halves == pytest.approx(whole, rel=1e-12)


SERIES = """
data = ["default"]
tokenizer = "bytes"
seq_len = 64
batch_size = 4
stages = [dict(name="0.1M", shape="cpu-1", lr=3e-3), dict(name="0.2M", shape="cpu-2", lr=2e-3)]
tokens_per_param = 0.1
series_mode = "grow"
warmup_steps = 2
grow_warmup_steps = 0
grow_optimizer = "grown"
grow_schedule = "continue"
eval_interval = 50
eval_batches = 1
log_interval = 1
ckpt_interval = 100
plot = False
report = False
"""


def test_series_grows_the_optimizer_and_continues_the_schedule(tmp_path):
    conf = tmp_path / "s.py"
    conf.write_text(SERIES + f"out_dir = {str(tmp_path / 's')!r}\ndata_dir = {str(tmp_path / 'data')!r}\n")
    cfg = configure(series.SeriesConfig, [str(conf)])
    stages, _ = series.plan_series(cfg)
    spans = series.schedule_spans(cfg, stages)
    flops = [6 * s.params * s.staged_tokens for s in stages]
    assert spans == [(0.0, pytest.approx(flops[0] / sum(flops))), (pytest.approx(flops[0] / sum(flops)), 1.0)]
    subprocess.run([sys.executable, "series.py", str(conf)], cwd=ROOT, env=ENV, check=True, capture_output=True)
    rows = lambda name: [json.loads(line) for line in open(tmp_path / "s" / "grow" / name / "metrics.jsonl")]
    first, second = ([r for r in rows(n) if "lr" in r] for n in ("0.1M", "0.2M"))
    n2 = second[-1]["step"]
    # stage 2 starts where stage 1's share of the one cosine ends (no re-warmup) and ends at min_lr
    assert second[0]["lr"] == pytest.approx(lr_at(0, n2, 2e-3, 0, "cosine", cfg.min_lr_ratio, span=spans[1]), rel=1e-6)
    assert first[-1]["lr"] > 0.5 * 3e-3 and second[-1]["lr"] == pytest.approx(2e-3 * cfg.min_lr_ratio, rel=1e-6)
    # the grown AdamW went on: carried parameters count stage 1's steps too, a new zero block only stage 2's
    steps = {e["step"].item() for e in load_checkpoint(tmp_path / "s" / "grow" / "0.2M" / "final.pt")["optimizer"]["state"].values()}
    assert steps == {n2, n2 + first[-1]["step"]}


def test_aki_query_heads_follow_their_kv_head():
    src_cfg = cfg(16, 4, 2, 24, 3)
    model = make_model(src_cfg)
    # 4/2 -> 8/2: no KV head is new, so every query head keeps layer l (before: four read l+1 against l's keys)
    same_kv = cfg(24, 8, 2, 40, 3)
    aki, fpi = (grow.grow(model, same_kv, width=w, noise=0.0) for w in ("aki", "fpi"))
    for l in range(3):
        for name in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(getattr(aki.layers[l].self_attn, name).weight, getattr(fpi.layers[l].self_attn, name).weight)
    # 4/2 -> 8/4: the query slots of a new KV head read layer l+1, exactly those
    maps = grow.width_maps(src_cfg, cfg(24, 8, 4, 40, 3), torch.Generator().manual_seed(0))
    kv_of_q = torch.arange(8) // 2
    assert torch.equal(maps.q_new.view(8, -1)[:, 0], maps.kv_new.view(4, -1)[kv_of_q, 0])
    assert maps.q_new.any() and not maps.q_new.all()


@pytest.mark.parametrize("heads", [(8, 2, 12, 6), (4, 1, 4, 2), (6, 2, 8, 4), (4, 2, 8, 4), (4, 2, 8, 2)])
def test_aki_keeps_every_original_head_in_its_own_layer(heads):
    # bert2BERT's AKI takes only the NEW units from the layer above. When the group shrinks (8/2 -> 12/6: G 4 -> 2),
    # the original query heads of an old KV group fill the slots of more than one of its KV copies; each of them,
    # and the KV copy it reads (H2), keeps its own layer's q/k/v rows, as its o_proj columns do
    H, Hk, Hn, Hkn = heads
    hd, src_cfg = 4, cfg(16, H, Hk, 24, 3)
    tgt_cfg = cfg(24, Hn, Hkn, 40, 3)
    model = make_model(src_cfg, seed=1)
    new, maps, _ = grow.grow_with_maps(model, tgt_cfg, width="aki", seed=0, noise=0.0)
    fpi = grow.grow(model, tgt_cfg, width="fpi", seed=0, noise=0.0)  # the same maps: every unit from its own layer
    q_heads, kv_heads, Gn = maps.q_heads.tolist(), maps.kv_heads.tolist(), Hn // Hkn

    def rows(w, h):
        return w[h * hd:(h + 1) * hd]

    for l in range(2):  # the top layer has no layer above
        a, f, above = new.layers[l].self_attn, fpi.layers[l].self_attn, fpi.layers[l + 1].self_attn
        assert torch.equal(a.o_proj.weight, f.o_proj.weight)  # out-weights: always the layer's own (H1)
        for j in range(H):  # every original query head: its first copy
            s = q_heads.index(j)
            assert torch.equal(rows(a.q_proj.weight, s), rows(f.q_proj.weight, s)), (l, j, s)
            for name in ("k_proj", "v_proj"):  # and the KV head it reads
                w, ref = getattr(a, name).weight, getattr(f, name).weight
                assert torch.equal(rows(w, s // Gn), rows(ref, s // Gn)), (l, j, name)
        for m in range(Hk):  # every original KV head's first copy
            assert torch.equal(rows(a.k_proj.weight, kv_heads.index(m)), rows(f.k_proj.weight, kv_heads.index(m)))
        # the new units: a query slot reads the layer above exactly when its KV head does (H2)
        for s in range(Hn):
            mine = torch.equal(rows(a.q_proj.weight, s), rows(f.q_proj.weight, s))
            assert mine != torch.equal(rows(a.q_proj.weight, s), rows(above.q_proj.weight, s)), (l, s)
            assert mine == torch.equal(rows(a.k_proj.weight, s // Gn), rows(f.k_proj.weight, s // Gn)), (l, s)
    if (H, Hk, Hn, Hkn) == (8, 2, 12, 6):  # the case: one KV copy of each old head is new, 4 query slots
        assert int(maps.kv_new.view(Hkn, hd)[:, 0].sum()) == 2 and int(maps.q_new.view(Hn, hd)[:, 0].sum()) == 4


def test_depth_orders_of_bert2bert_and_llama_pro():
    # bert2BERT Algorithm 1 stacks the top layers for a remainder; "stack" keeps the bottom ones
    assert [s for s, _ in grow.depth_plan(18, 22, "stack_top")] == list(range(18)) + [14, 15, 16, 17]
    assert [s for s, _ in grow.depth_plan(18, 22, "stack")] == list(range(18)) + [0, 1, 2, 3]
    assert [s for s, _ in grow.depth_plan(4, 10, "stack_top")] == [0, 1, 2, 3, 0, 1, 2, 3, 2, 3]
    # LLaMA-Pro (Wu et al. 2024): 32 layers in 8 groups of 4, a zero block after each group's top layer
    plan = grow.depth_plan(32, 40, "zero_groups")
    assert [t for t, (_, z) in enumerate(plan) if z] == [4 + 5 * i for i in range(8)]
    assert [s for s, z in plan if z] == [3 + 4 * i for i in range(8)]
    model = make_model(cfg(12, 3, 3, 20, 3))
    new = grow.grow(model, cfg(20, 5, 5, 36, 5), depth="zero_groups", noise=1e-3)
    assert grow.function_gap(model, new, torch.randint(0, 37, (2, 12))) < 1e-10  # Z keeps the function
    assert grow.is_function_preserving("fpi", "zero_groups", 3, 5)


def llama_pro_expansion(n_old, n_new):
    """The old layers after which LLaMA-Pro's scripts/block_expansion.py (TencentARC/LLaMA-Pro) inserts a copy with
    zeroed o_proj/down_proj: split = int(L / (L' - L)), one after every layer i with (i + 1) % split == 0; None where
    its `assert layer_cnt == args.layers` fails (more than L' - L such layers, e.g. 10 -> 14) or split is 0."""
    split = int(n_old / (n_new - n_old))
    if split == 0:
        return None
    after = [i for i in range(n_old) if (i + 1) % split == 0]
    return after if n_old + len(after) == n_new else None


def test_zero_groups_follows_llama_pro_at_every_size():
    # the case: 18 -> 22 inserts after 3, 7, 11, 15 (as LLaMA-Pro's script), not 4, 8, 13, 17
    plan = grow.depth_plan(18, 22, "zero_groups")
    assert [s for s, z in plan if z] == [3, 7, 11, 15] and len(plan) == 22
    checked = 0
    for n_old in range(1, 41):
        for n_new in range(n_old + 1, 2 * n_old + 9):
            plan = grow.depth_plan(n_old, n_new, "zero_groups")
            after = [s for s, z in plan if z]
            assert len(plan) == n_new and [s for s, z in plan if not z] == list(range(n_old))
            assert all(s == plan[t - 1][0] for t, (s, z) in enumerate(plan) if z)  # a new block copies the one below
            expected = llama_pro_expansion(n_old, n_new)
            if expected is not None:  # the sizes LLaMA-Pro's script runs at: the same layers
                assert after == expected, (n_old, n_new)
                checked += 1
            elif n_new - n_old <= n_old:  # where it stops: its first L' - L groups, split = L // (L' - L) layers each
                split = n_old // (n_new - n_old)
                assert after == [(i + 1) * split - 1 for i in range(n_new - n_old)], (n_old, n_new)
            else:  # more new layers than old ones: rounds of one new layer after every old one, bottom first
                assert all(abs(after.count(a) - after.count(b)) <= 1 for a in range(n_old) for b in range(n_old))
    assert checked > 250  # of the 1,140 sizes


@pytest.mark.parametrize("width", ["fpi", "aki"])
def test_bfloat16_growth_rounds_once(width):
    # grown in bf16 = grown in float32 from the same bf16 weights, then cast: no 1/sqrt(k) rounded before its product
    src_cfg, tgt_cfg = EXACT[2]
    model = make_model(src_cfg, dtype=torch.bfloat16)
    new = grow.grow(model, tgt_cfg, width=width, seed=3, noise=1e-3)
    ref = grow.grow(model.float(), tgt_cfg, width=width, seed=3, noise=1e-3).to(torch.bfloat16)
    for (name, p), q in zip(new.state_dict().items(), ref.state_dict().values()):
        if not name.startswith("rope"):
            assert p.dtype == torch.bfloat16 and torch.equal(p, q), name


def test_grown_rope_tables_are_float64_like_a_fresh_models():
    src_cfg, tgt_cfg = EXACT[0]
    for dtype in (torch.float32, torch.bfloat16):
        new = grow.grow(make_model(src_cfg, dtype=dtype), replace(tgt_cfg, max_seq_len=32))
        cos, sin = rope_cos_sin(tgt_cfg.head_dim, 32, tgt_cfg.rope_theta)
        assert new.rope_cos.dtype == torch.float64 and torch.equal(new.rope_cos, cos) and torch.equal(new.rope_sin, sin)
