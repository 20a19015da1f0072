"""posttrain.py, chat_data.py and judge.py: the chat template, SFT's masking and its normalization across gradient
accumulation, padding invariance, DPO and SimPO against their closed forms and the one preference loss that
picks between them, precomputed vs live reference log-probs, LoRA merging, a few DPO steps raising the
margin, the CLI end to end (sft -> dpo -> chat), exact resume of a killed SFT / DPO (LoRA) run, chat never
sampling unused ids, inputs that do not fit (long DPO prompts, a mismatched --ref, pairs with two prompts, SimPO's
own defaults, conversations longer than the context, out-of-range settings, malformed data: one error line, exit 2),
and the MT-Bench judge client against a local HTTP server. All on CPU with tiny models
and the fixtures in tests/fixtures/posttrain/ (a few rows in the schemas of ultrachat_200k,
ultrafeedback_binarized and mt_bench_prompts)."""

import contextlib
import http.server
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, fields, replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import chat_data  # noqa: E402
import judge  # noqa: E402
import posttrain as pt  # noqa: E402
from checkpoint import checkpoint_paths, load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from common import ConfigError, check_config, configure  # noqa: E402
from data import SPECIALS, Tokenizer, get_tokenizer  # noqa: E402
from model import IGNORE_INDEX, Llama, ModelConfig  # noqa: E402

FIX = os.path.join(ROOT, "tests", "fixtures", "posttrain")
SFT_DATA, DPO_DATA, MT_DATA = (os.path.join(FIX, f) for f in ("ultrachat_200k.jsonl", "ultrafeedback_binarized.jsonl", "mt_bench_prompts.jsonl"))
TOK = get_tokenizer("bytes")
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}]


def tiny(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Llama(ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)).to(dtype)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "base.pt")
    m = tiny()
    save_checkpoint({"model": m.state_dict(), "model_config": asdict(m.config), "tokenizer": {"name": "bytes", "vocab_size": 320},
                     "step": 100, "tokens": 12800, "flops": 1.0e9, "history": [{"op": "pretrain"}]}, path)
    return path


def sft_examples(n=8):
    rows = chat_data.load_rows(SFT_DATA, "train_sft", ["messages"])[:n]
    return [chat_data.sft_example(TOK, r["messages"], 256) for r in rows]


def dpo_pairs(n=6):
    return [chat_data.dpo_example(TOK, r, 256, 128) for r in chat_data.load_rows(DPO_DATA, "train_prefs", ["chosen", "rejected"])[:n]]


def test_chat_template_prefix_and_mask():
    ids, mask = chat_data.render_chat(TOK, CONV)
    sp = TOK.special
    assert ids[0] == TOK.eot_id and all(sp[s] > 255 for s in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
    assert ids.count(sp["<|end|>"]) == len(CONV)  # an end-of-turn after every turn
    for k, m in enumerate(CONV):
        if m["role"] == "assistant":  # the prompt of turn k, as generation sees it, is a prefix of the whole
            prompt, _ = chat_data.render_chat(TOK, CONV[:k], add_generation_prompt=True)
            assert ids[:len(prompt)] == prompt and prompt[-1] == sp["<|assistant|>"]
    # the mask covers exactly the answers and their <|end|>
    assert TOK.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<|end|>4.<|end|>"
    # gpt2's layout (data.get_tokenizer; its BPE files come from the network or NANOGROW_GPT2_BPE): the specials sit in the ids that padding
    # the vocab to 50304 adds, so the embedding does not grow
    g = Tokenizer("gpt2", 50304, 50257, {"<|endoftext|>": 50256, **{s: 50257 + i for i, s in enumerate(SPECIALS[1:])}})
    gids, _ = chat_data.render_chat(g, CONV, add_generation_prompt=True)
    assert gids[0] == 50256 and max(gids) < 50304 and {50257, 50258, 50259, 50260} <= set(gids)
    with pytest.raises(ConfigError, match="bad message"):
        chat_data.render_chat(TOK, [{"role": "robot", "content": "x"}])


def test_sft_loss_ignores_everything_but_answers():
    ids, mask = chat_data.render_chat(TOK, CONV)
    x, y = chat_data.collate([chat_data.Example(ids, mask)], TOK.special["<|pad|>"], multiple=16)
    assert x.shape[1] % 16 == 0
    kept = (y[0] != IGNORE_INDEX).nonzero().flatten().tolist()
    assert kept == [t for t in range(len(ids) - 1) if mask[t + 1]] and y[0, kept].tolist() == [ids[t + 1] for t in kept]
    # the loss's gradient is exactly zero at every prompt (and pad) position, whatever the logits there
    logits = torch.randn(1, x.shape[1], 320, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX).backward()
    zero = torch.ones(x.shape[1], dtype=torch.bool)
    zero[kept] = False
    assert logits.grad[0, zero].abs().max() == 0 and logits.grad[0, kept].abs().min() > 0
    # and so changing the prompt positions' targets changes nothing: the SFT loss reads only the answers
    y2 = y.clone()
    y2[0, zero] = IGNORE_INDEX
    model = tiny()
    assert torch.equal(pt.sequence_logps(model, x, y)[0], pt.sequence_logps(model, x, y2)[0])
    # loss_on="all" (the zephyr recipe, Tunstall et al. 2023) trains every token after the first
    mask_all = chat_data.sft_example(TOK, CONV, 256, loss_on="all").mask
    assert mask_all.tolist() == [False] + [True] * (len(ids) - 1)


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_accumulation_over_4_micro_batches_equals_one_batch():
    model, exs, pad = tiny(torch.float64), sft_examples(8), TOK.special["<|pad|>"]
    loss_big, n_big = pt.sft_accumulate(model, [chat_data.collate(exs, pad)])
    g_big = grads(model)
    model.zero_grad()
    micro = [chat_data.collate(exs[i:i + 2], pad, multiple=8) for i in range(0, 8, 2)]  # other padding too
    loss_acc, n_acc = pt.sft_accumulate(model, micro)
    assert n_big == n_acc and torch.allclose(loss_big, loss_acc, rtol=0, atol=1e-12)
    assert torch.allclose(g_big, grads(model), rtol=0, atol=1e-12)
    # a mean per micro-batch (the naive way) weighs short conversations more, and the test would see it
    model.zero_grad()
    for x, y in micro:
        (model(x, y)[1] / 4).backward()
    assert not torch.allclose(g_big, grads(model), rtol=0, atol=1e-6)


def test_log_probs_do_not_depend_on_padding():
    model, pad = tiny(torch.float64), TOK.special["<|pad|>"]
    exs = sft_examples(4)
    short = min(exs, key=lambda e: len(e.ids))
    alone = pt.sequence_logps(model, *chat_data.collate([short], pad))[0]
    padded = pt.sequence_logps(model, *chat_data.collate([short], pad, multiple=128))[0]
    batched = pt.sequence_logps(model, *chat_data.collate([short] + exs, pad))[0][0]
    assert torch.allclose(alone, padded, atol=1e-10) and torch.allclose(alone[0], batched, atol=1e-10)


def test_dpo_loss_is_log2_at_the_reference_with_half_beta_gradients():
    beta, n = 0.1, 5
    torch.manual_seed(0)
    pc, pr = (torch.randn(n, dtype=torch.float64).mul(30).requires_grad_() for _ in range(2))
    loss, metrics = pt.dpo_loss(pc, pr, pc.detach().clone(), pr.detach().clone(), beta)
    assert loss.item() == math.log(2) and metrics["rewards/margins"] == 0
    loss.backward()  # the mean over n pairs: per pair -beta/2 on the chosen, +beta/2 on the rejected
    assert torch.allclose(pc.grad * n, torch.full((n,), -beta / 2, dtype=torch.float64))
    assert torch.allclose(pr.grad * n, torch.full((n,), beta / 2, dtype=torch.float64))
    rc, rr = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    z = beta * ((pc - rc) - (pr - rr)).detach()
    expected = torch.log1p(torch.exp(-z)).mean()
    loss, metrics = pt.dpo_loss(pc, pr, rc, rr, beta)
    assert abs(loss.item() - expected.item()) < 1e-12
    assert abs(metrics["rewards/margins"] - z.mean().item()) < 1e-12 and metrics["rewards/accuracy"] == pytest.approx((z > 0).double().mean().item())


def test_simpo_matches_float64_closed_form():
    torch.manual_seed(1)
    beta, gamma = 2.0, 1.0
    c, r = -torch.rand(16) * 3, -torch.rand(16) * 3  # mean log-probs per completion token
    loss, metrics = pt.simpo_loss(c, r, beta, gamma)
    cd, rd = c.double(), r.double()
    expected = sum(math.log1p(math.exp(-(beta * a - beta * b - gamma))) for a, b in zip(cd.tolist(), rd.tolist())) / 16
    assert abs(loss.item() - expected) < 1e-6
    assert abs(metrics["rewards/margins"] - (beta * (cd - rd)).mean().item()) < 1e-5


def test_preference_loss_is_dpo_or_simpo_and_only_dpo_asks_for_the_reference():
    torch.manual_seed(2)
    sums, counts = -torch.rand(6, dtype=torch.float64) * 50, torch.randint(5, 20, (6,))  # 3 chosen rows, then 3 rejected
    ref = -torch.rand(3, 2, dtype=torch.float64) * 50
    loss, metrics = pt.preference_loss(sums, counts, pt.PostTrainConfig(loss="dpo", beta=0.1), lambda: ref)
    expected, expected_metrics = pt.dpo_loss(sums[:3], sums[3:], ref[:, 0], ref[:, 1], 0.1)
    assert torch.equal(loss, expected) and metrics == expected_metrics
    no_reference = lambda: pytest.fail("SimPO ran the reference")
    loss, _ = pt.preference_loss(sums, counts, pt.PostTrainConfig(loss="simpo", beta=2.0, gamma=1.0), no_reference)
    assert torch.equal(loss, pt.simpo_loss(sums[:3] / counts[:3], sums[3:] / counts[3:], 2.0, 1.0)[0])


def test_reference_log_probs_precomputed_equal_live():
    ref, pad = tiny(torch.float64, seed=3), TOK.special["<|pad|>"]
    pairs = dpo_pairs(6)
    table = pt.reference_logps(ref, pairs, batch_size=4, pad_id=pad, device="cpu")
    idx = [5, 0, 2]  # a training micro-batch: other examples, other order, other padding
    x, y = chat_data.collate([pairs[i].chosen for i in idx] + [pairs[i].rejected for i in idx], pad, multiple=32)
    live = pt.sequence_logps(ref, x, y)[0].view(2, -1).T
    assert torch.allclose(table[idx], live, rtol=0, atol=1e-10)
    assert (table < 0).all()


@pytest.mark.parametrize("moe", [False, True])
def test_lora_merged_equals_unmerged(moe):
    model = tiny(torch.float64)
    if moe:  # a mixture of experts: adapters on every expert's projections, the router frozen
        torch.manual_seed(1)
        model = Llama(replace(model.config, moe_experts=4, moe_top_k=2)).to(torch.float64).eval()
    plain_keys = set(model.state_dict())
    base_logits = model(torch.arange(40)[None] % 256)[0]
    pt.add_lora(model, rank=4, alpha=8, targets="q,v,o,gate,down")
    adapted = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert len(adapted) == len(model.layers) * (3 + 2 * (4 if moe else 1))  # q, v, o and gate, down of each MLP
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, pt.LoRALinear):
                m.lora_B.normal_(std=0.1)  # as after training: B starts at zero
    lora_logits = model(x)[0]
    with pt.adapters_disabled(model):  # DPO's reference without a second copy: the base model again
        assert torch.allclose(model(torch.arange(40)[None] % 256)[0], base_logits, atol=1e-12)
    state = pt.merged_state_dict(model)
    assert set(state) == plain_keys
    plain = Llama(model.config).to(torch.float64)
    plain.load_state_dict(state)  # strict: a plain Llama
    merged_logits = plain(x)[0]
    assert torch.allclose(lora_logits, merged_logits, rtol=0, atol=1e-10)
    assert not torch.allclose(merged_logits, Llama(model.config).to(torch.float64)(x)[0])
    with pytest.raises(ConfigError, match="lora_targets"):
        pt.add_lora(tiny(), rank=2, alpha=2, targets="q,qq")


def test_dpo_steps_raise_the_margin(base_ckpt, tmp_path):
    cfg = configure(pt.PostTrainConfig, [f"--out={tmp_path / 'dpo'}", f"--data={DPO_DATA}", "--batch_size=4", "--grad_accum=2",
                                            "--max_steps=8", "--lr=1e-3", "--beta=0.1", "--log_interval=4", "--plot=false", "--device=cpu"])
    final = pt.train("dpo", base_ckpt, cfg, log=lambda *a: None)
    pairs, pad = dpo_pairs(24), TOK.special["<|pad|>"]
    ref = pt.reference_logps(model_from_checkpoint(load_checkpoint(base_ckpt)), pairs, 8, pad, "cpu")
    pol = pt.reference_logps(model_from_checkpoint(load_checkpoint(final)), pairs, 8, pad, "cpu")
    margins = 0.1 * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))  # zero before the first step
    assert margins.mean() > 0.05 and (margins > 0).double().mean() > 0.7
    rows = [json.loads(line) for line in open(tmp_path / "dpo" / "metrics.jsonl")]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]


def test_data_errors_name_the_column(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ConfigError, match=r"no column 'messages' \(columns found: text\).*ultrachat_200k"):
        chat_data.load_rows(str(bad), "train_sft", ["messages"])
    with pytest.raises(ConfigError, match=r"no column 'chosen', 'rejected'"):
        chat_data.load_rows(str(bad), "train_prefs", ["chosen", "rejected"])
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = chat_data.load_rows(SFT_DATA, "train_sft", ["messages"])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    assert chat_data.load_rows(str(tmp_path / "chat.parquet"), "train_sft", ["messages"], limit=5) == rows[:5]
    cmd, ckpt, cfg = pt.parse_args(["dpo", "x.pt", os.path.join(ROOT, "configs", "dpo_paper.py"), "--ref", "r.pt", "--lr", "1e-6", "--compile"])
    assert (cmd, ckpt, cfg.ref, cfg.lr, cfg.beta, cfg.compile) == ("dpo", "x.pt", "r.pt", 1e-6, None, True)
    pt.resolve(cmd, cfg)  # beta left to the loss: DPO's 0.01 (with --loss=simpo it would be SimPO's 2.0)
    assert cfg.beta == 0.01
    assert pt.parse_args(["sft", "x.pt", os.path.join(ROOT, "configs", "sft_paper.py")])[2].lr == 3e-5
    assert pt.parse_args(["dpo", "x.pt", os.path.join(ROOT, "configs", "dpo_paper.py")])[2].lr == 5e-7


def run(*args):
    return subprocess.run([sys.executable, "posttrain.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_sft_then_dpo_then_chat(base_ckpt, tmp_path):
    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    out = run("sft", base_ckpt, "configs/sft_tiny.py", f"--out={sft_dir}", "--max_steps=6", "--log_interval=3")
    assert out.returncode == 0, out.stderr
    sft = load_checkpoint(sft_dir / "final.pt")
    assert sft["tokenizer"] == {"name": "bytes", "vocab_size": 320} and sft["tokens"] == 12800 and sft["flops"] > 1.0e9
    assert sft["start_flops"] == 1.0e9 and sft["flops"] == 1.0e9 + sft["history"][-1]["flops"]  # checkpoint.py's lineage
    assert [h["op"] for h in sft["history"]] == ["pretrain", "sft"] and os.path.exists(sft_dir / "loss.png")
    rows = [json.loads(line) for line in open(sft_dir / "metrics.jsonl")]
    assert {"step", "loss", "lr", "ex_s", "tok_s", "elapsed"} <= set(rows[0]) and any("val_loss" in r for r in rows)
    out = run("dpo", str(sft_dir / "final.pt"), "--ref", str(sft_dir / "final.pt"), "configs/dpo_tiny.py", f"--out={dpo_dir}",
              "--max_steps=3", "--lora_rank=4", "--lora_targets=q,v", "--ref_mode=live", "--plot=false")
    assert out.returncode == 0, out.stderr
    dpo = load_checkpoint(dpo_dir / "final.pt")
    assert [h["op"] for h in dpo["history"]] == ["pretrain", "sft", "dpo"] and dpo["flops"] > sft["flops"]
    assert dpo["history"][-1]["lora"]["rank"] == 4 and set(dpo["model"]) == set(sft["model"])  # merged: a plain Llama
    model_from_checkpoint(dpo)
    out = run("chat", str(dpo_dir / "final.pt"), "--prompt", "What is 2 plus 3?", "--max_new_tokens=8", "--device=cpu")
    assert out.returncode == 0 and out.stdout.strip() != "", out.stderr


def test_cli_errors_are_one_line_exit_2(base_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversation": []}) + "\n")
    for argv, expected in ((["sft", base_ckpt, f"--data={bad}", f"--out={tmp_path / 'x'}"], "'messages'"),
                           (["sft", base_ckpt, "--lrr=1"], "unknown config key 'lrr'"),
                           (["dpo", str(tmp_path / "missing.pt")], "no checkpoint at"),
                           (["train", base_ckpt], "usage: python posttrain.py sft|dpo|chat")):
        with pytest.raises(SystemExit) as e:
            pt.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and expected in err and "\n" not in err, err


def metric_rows(out_dir):
    """metrics.jsonl without the timings, which differ from run to run."""
    timing = ("ex_s", "tok_s", "elapsed")
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(out_dir / "metrics.jsonl")]


# DPO with LoRA and adapter dropout: the resumed run needs the adapters (not only the merged weights), the RNG
# states (dropout masks) and the precomputed reference log-probs; 10 examples a step cross the 24-row epochs
RESUME_ARGS = {"sft": ["configs/sft_tiny.py", "--max_steps=20"],
               "dpo": ["configs/dpo_tiny.py", "--max_steps=16", "--lr=1e-3", "--lora_rank=4", "--lora_targets=q,v,down", "--lora_dropout=0.1"]}


@pytest.mark.parametrize("cmd", ["sft", "dpo"])
def test_killed_run_resumes_bit_for_bit(cmd, tmp_path, monkeypatch, capsys):
    base = str(tmp_path / "base.pt")
    m = Llama(ModelConfig(vocab_size=320, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=256))
    save_checkpoint({"model": m.state_dict(), "model_config": asdict(m.config), "tokenizer": {"name": "bytes", "vocab_size": 320},
                     "history": [{"op": "pretrain"}]}, base)  # larger than tiny(): ~50 ms a step leaves time to kill
    args = lambda out: [cmd, base, *RESUME_ARGS[cmd], f"--out={out}", "--batch_size=5", "--grad_accum=2", "--eval_examples=4",
                        "--ckpt_interval=5", "--keep_last=2", "--log_interval=1", "--plot=false"]
    max_steps = int(RESUME_ARGS[cmd][1].split("=")[1])
    full, killed = tmp_path / "full", tmp_path / "killed"
    out = run(*args(full))
    assert out.returncode == 0, out.stderr
    # the same run, killed (SIGKILL: no cleanup) once it has logged step 7, i.e. after the step-5 checkpoint
    proc = subprocess.Popen([sys.executable, "posttrain.py", *args(killed)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").exists() and max([r["step"] for r in metric_rows(killed)] or [0]) >= 7:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "final.pt").exists() and (killed / "ckpt_0000005.pt").exists()
    logged_before_resume = max(r["step"] for r in metric_rows(killed))
    out = run(*args(killed), "--resume")
    assert out.returncode == 0, out.stderr
    resumed_at = int(re.search(r"resumed at step (\d+)", out.stdout).group(1))
    assert 5 <= resumed_at <= logged_before_resume < max_steps  # later steps were logged, dropped and run again
    # every logged number (loss, lr, grad norm, DPO rewards, validation) is the uninterrupted run's, bit for bit
    expected, got = metric_rows(full), metric_rows(killed)
    assert [r["step"] for r in got if "loss" in r] == list(range(1, max_steps + 1))
    assert got == expected, [(a, b) for a, b in zip(got, expected) if a != b][:2]
    a, b = load_checkpoint(full / "final.pt"), load_checkpoint(killed / "final.pt")
    assert set(a["model"]) == set(m.state_dict()) and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (a["step"], a["tokens"], a["flops"], a["history"][-1]["tokens"]) == (b["step"], b["tokens"], b["flops"], b["history"][-1]["tokens"])
    # the last keep_last periodic checkpoints remain; each is a plain Llama for chat, with the live module beside it
    kept = sorted(p.name for p in killed.glob("ckpt_*.pt"))
    assert kept == [f"ckpt_{s:07d}.pt" for s in range(5, max_steps, 5)][-2:]
    last = load_checkpoint(killed / kept[-1])
    model_from_checkpoint(last)
    assert any(k.endswith("lora_A") for k in last["resume"]["module"]) == (cmd == "dpo")
    # resuming over other data is refused before anything is touched
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        pt.main(args(killed) + ["--max_examples=20", "--resume"])
    assert e.value.code == 2 and "examples changed" in capsys.readouterr().err
    assert metric_rows(killed) == expected


def test_chat_never_samples_unused_ids():
    """A barely trained model can prefer the vocab's padding ids (262..319 for bytes); chat must not show them."""
    model = tiny().eval()
    unused = list(range(TOK.n_base + len(TOK.special), 320))
    assert TOK.unused_ids(320) == unused
    head = torch.nn.Linear(64, 320, bias=True)  # an lm_head that strongly prefers every unused id
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[unused] = 30.0
    model.lm_head = head
    msgs = [{"role": "user", "content": "Hi there"}]
    prompt = torch.tensor([chat_data.render_chat(TOK, msgs, add_generation_prompt=True)[0]])
    assert set(model.generate(prompt, 8, temperature=0)[0, prompt.shape[1]:].tolist()) <= set(unused)  # unmasked: only those
    gen = torch.Generator().manual_seed(0)
    for temperature, top_k in ((0, 0), (1.0, 0), (1.0, 5), (2.0, 50)):
        text = pt.reply(model, TOK, msgs, max_new_tokens=24, temperature=temperature, top_k=top_k, generator=gen)
        assert text and not re.search(r"<\|\d+\|>", text), text
    with torch.no_grad():
        head.bias[TOK.special["<|end|>"]] = 20.0  # end-of-turn stays allowed: next best after the unused ids, it ends the reply
    assert pt.reply(model, TOK, msgs, temperature=0) == ""
    assert model.generate(prompt, 4, temperature=0)[0, prompt.shape[1]:].tolist()[0] in unused  # reply leaves the model itself unchanged


def test_chat_interactive(base_ckpt, monkeypatch, capsys):
    lines = iter(["What is 2 plus 3?", "/reset", "And 4?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    pt.main(["chat", base_ckpt, "--max_new_tokens=5", "--temperature=0", "--device=cpu"])
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and "/reset" in out.splitlines()[0]


# -----------------------------------------------------------------------------
# inputs that do not fit: lengths, the reference, preference pairs, SimPO's defaults, chat's context, the settings
# and malformed data. Every input problem is one "error: ..." line on stderr and exit code 2.


def one_line_error(argv, capsys, main=None):
    """The stderr line of main(argv), which must exit with code 2 and print nothing else there."""
    with pytest.raises(SystemExit) as e:
        (main or pt.main)(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def save_tiny(path, vocab_size=320, max_seq_len=256, tokenizer=None):
    torch.manual_seed(0)
    m = Llama(ModelConfig(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=max_seq_len))
    save_checkpoint({"model": m.state_dict(), "model_config": asdict(m.config), "tokenizer": tokenizer or {"name": "bytes", "vocab_size": 320},
                     "history": [{"op": "pretrain"}]}, str(path))
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dpo_prompt_longer_than_max_len_keeps_its_end(base_ckpt, tmp_path):
    # the defaults (max_len 1024, max_prompt_len 512) on a 256-token model: both clamped, with a note each
    assert chat_data.sequence_lengths("dpo", 1024, 512, 256)[:2] == (256, 128)
    assert chat_data.sequence_lengths("dpo", 1024, 200, 256)[:2] == (256, 200) and chat_data.sequence_lengths("sft", 1024, 512, 256)[:2] == (256, 512)
    assert chat_data.sequence_lengths("dpo", 256, 100, 256) == (256, 100, [])
    assert len(chat_data.sequence_lengths("dpo", 1024, 512, 256)[2]) == 2
    # a 300-token question (the old code cut nothing from a prompt under max_prompt_len, so the pair overflowed
    # max_len and collate crashed): the prompt keeps its last max_prompt_len tokens, the question's end, as TRL
    rows = chat_data.load_rows(DPO_DATA, "train_prefs", ["chosen", "rejected"])[:4]
    for r in rows:
        long = "lorem ipsum " * 25 + r["prompt"]
        r["prompt"] = r["chosen"][0]["content"] = r["rejected"][0]["content"] = long
        r["chosen"][-1]["content"] *= 6
        r["rejected"][-1]["content"] *= 6
    ex = chat_data.dpo_example(TOK, rows[0], 256, 128)
    prompt_len = int((~ex.chosen.mask).sum())  # the mask is 0 exactly over the prompt
    full_prompt = chat_data.render_chat(TOK, rows[0]["chosen"][:-1], add_generation_prompt=True)[0]
    assert prompt_len == 128 and ex.chosen.ids[:128].tolist() == full_prompt[-128:]
    assert len(ex.chosen.ids) <= 256 and len(ex.rejected.ids) <= 256 and ex.rejected.mask[1:].any()
    notes = []
    cfg = configure(pt.PostTrainConfig, [f"--out={tmp_path / 'dpo'}", f"--data={write_jsonl(tmp_path / 'long.jsonl', rows)}",
                                            "--batch_size=2", "--grad_accum=1", "--max_steps=1", "--plot=false", "--device=cpu"])
    assert (cfg.max_len, cfg.max_prompt_len) == (1024, 512)  # the defaults
    assert os.path.exists(pt.train("dpo", base_ckpt, cfg, log=notes.append))
    assert any("max_prompt_len 512" in n and "using 128" in n for n in notes) and any("max_len 1024" in n for n in notes)


def test_ref_is_checked_when_loaded(base_ckpt, tmp_path, capsys):
    args = lambda ref: ["dpo", base_ckpt, f"--ref={ref}", f"--data={DPO_DATA}", f"--out={tmp_path / 'o'}", "--max_steps=1",
                        "--batch_size=2", "--grad_accum=1", "--plot=false", "--device=cpu"]
    short = save_tiny(tmp_path / "short.pt", max_seq_len=128)  # would score cut sequences: the old code cut them silently
    err = one_line_error(args(short), capsys)
    assert "max_seq_len 128, shorter than max_len 256" in err and "--max_len=128" in err
    err = one_line_error(args(save_tiny(tmp_path / "wide.pt", vocab_size=384)), capsys)
    assert "vocab_size 384" in err and "320" in err
    err = one_line_error(args(save_tiny(tmp_path / "gpt2.pt", tokenizer={"name": "gpt2", "vocab_size": 50304})), capsys)
    assert "tokenizer" in err and "gpt2" in err
    # a --ref the run would not read is refused, not ignored: SimPO has no reference, nor has SFT
    for argv in (args(short) + ["--loss=simpo"], ["sft", base_ckpt, f"--ref={short}", f"--out={tmp_path / 'o'}"]):
        err = one_line_error(argv, capsys)
        assert err.startswith(f"error: ref={short!r}: must be empty here") and "--loss=dpo" in err, err
    assert not (tmp_path / "o" / "final.pt").exists()


def test_preference_pair_with_different_prompts_is_refused(base_ckpt, tmp_path, capsys):
    rows = chat_data.load_rows(DPO_DATA, "train_prefs", ["chosen", "rejected"])[:6]
    rows[3]["rejected"][0]["content"] = "A question nobody asked."
    err = one_line_error(["dpo", base_ckpt, f"--data={write_jsonl(tmp_path / 'p.jsonl', rows)}", f"--out={tmp_path / 'o'}",
                          "--max_steps=1", "--plot=false", "--device=cpu"], capsys)
    assert "row 3" in err and "different prompts" in err
    # conversational rows: the whole message prefix must agree, an extra turn too
    row = {"chosen": CONV, "rejected": CONV[:1] + CONV[3:]}
    with pytest.raises(ConfigError, match="different prompts"):
        chat_data.dpo_example(TOK, row, 256, 128)
    chat_data.dpo_example(TOK, {"chosen": CONV, "rejected": CONV[:-1] + [{"role": "assistant", "content": "5."}]}, 256, 128)


def test_simpo_has_its_own_defaults():
    def resolved(*args):
        cfg = configure(pt.PostTrainConfig, list(args))
        pt.resolve("dpo", cfg)
        return cfg.beta, cfg.gamma
    # SimPO (Meng et al. 2024): beta 2.0, gamma / beta 0.5 on Llama-3-Base, not DPO's beta 0.01
    assert resolved("--loss=simpo") == (2.0, 1.0)
    assert resolved("--loss=simpo", "--beta=2.5") == (2.5, 1.25)  # a given beta wins, the margin keeps the ratio
    assert resolved("--loss=simpo", "--beta=2.5", "--gamma=0.3") == (2.5, 0.3)
    assert resolved("--loss=simpo", "--gamma=0") == (2.0, 0.0)
    assert resolved()[0] == 0.01 and resolved("--beta=0.1")[0] == 0.1
    # an unresolved config gets the same defaults in preference_loss, and nanogrow's gamma is TRL's simpo_gamma:
    # CPOTrainer(loss_type="simpo") computes -log sigmoid(beta * ((c - r) - simpo_gamma / beta))
    torch.manual_seed(3)
    sums, counts = -torch.rand(8, dtype=torch.float64) * 40, torch.randint(4, 30, (8,))
    loss, _ = pt.preference_loss(sums, counts, pt.PostTrainConfig(loss="simpo"), lambda: pytest.fail("SimPO ran the reference"))
    c, r = sums[:4] / counts[:4], sums[4:] / counts[4:]
    trl = -torch.nn.functional.logsigmoid(2.0 * ((c - r) - 1.0 / 2.0)).mean()
    assert torch.allclose(loss, trl, rtol=0, atol=1e-12)


def test_chat_and_judge_keep_the_question_within_the_context(capsys):
    sp = TOK.special
    history = [{"role": "user", "content": f"old question {i}"} if i % 2 == 0 else {"role": "assistant", "content": "old answer " * 3}
               for i in range(8)]  # 4 exchanges of 51 tokens
    question = {"role": "user", "content": "What is 2 plus 3?"}
    msgs = [{"role": "system", "content": "Be brief."}] + history + [question]
    # the defaults on a 256-token model (max_new_tokens 256): the old code kept 1 prompt token, whatever was asked
    ids, max_new, note = chat_data.fit_prompt(TOK, msgs, 256, 256)
    q_ids = chat_data.render_chat(TOK, [question], add_generation_prompt=True)[0][1:]
    assert ids[-len(q_ids):] == q_ids and ids[0] == TOK.eot_id and sp["<|system|>"] in ids  # the system prompt fits
    assert len(ids) <= 128 and max_new == 256 - len(ids) and "dropped the" in note and "capped" in note
    kept = TOK.decode(ids)
    assert "old question 6" in kept and "old question 4" not in kept and "dropped the 6 oldest" in note  # whole exchanges, oldest first
    assert chat_data.fit_prompt(TOK, [question], 256, 64) == (chat_data.render_chat(TOK, [question], add_generation_prompt=True)[0], 64, "")
    # the newest message alone is too long: it keeps its end inside the template, and says so
    huge = {"role": "user", "content": "x" * 500 + " What is 2 plus 3?"}
    ids, max_new, note = chat_data.fit_prompt(TOK, [msgs[0], huge], 256, 256)
    assert len(ids) == 128 and ids[:2] == [TOK.eot_id, sp["<|user|>"]] and ids[-2:] == [sp["<|end|>"], sp["<|assistant|>"]]
    assert TOK.decode(ids[2:-2]).endswith("What is 2 plus 3?") and max_new == 128 and "last" in note and "system prompt" in note
    # chat (reply) and judge.py generate from exactly that prompt, and print the note on stderr
    model, seen = tiny().eval(), []
    model.generate = lambda idx, n, **kw: (seen.append((idx[0].tolist(), n)), torch.cat([idx, torch.full((1, 1), sp["<|end|>"])], 1))[1]
    pt.reply(model, TOK, msgs, max_new_tokens=256, temperature=0)
    assert seen[-1] == chat_data.fit_prompt(TOK, msgs, 256, 256)[:2] and "note: " in capsys.readouterr().err
    judge.generate_answers(model, TOK, judge.load_questions(MT_DATA)[:1], max_new_tokens=512)
    first, second = seen[-2:]
    assert TOK.decode(first[0]).endswith("Write a two-line poem about the sea.<|end|><|assistant|>") and first[1] == 256 - len(first[0])
    assert "two-line poem" in TOK.decode(second[0]) and "Now make it rhyme." in TOK.decode(second[0])


BAD_SETTINGS = [("eval_examples", "-1"), ("eval_interval", "-1"), ("max_examples", "-1"), ("max_len", "1"), ("max_prompt_len", "0"),
                ("batch_size", "0"), ("grad_accum", "0"), ("epochs", "0"), ("max_steps", "-1"), ("lr", "-1e-5"), ("lr", "1e999"),
                ("warmup_frac", "1.5"), ("min_lr_ratio", "-0.1"), ("weight_decay", "-1"), ("beta1", "1.0"), ("beta2", "-0.5"),
                ("grad_clip", "-1"), ("beta", "0"), ("beta", "-2"), ("gamma", "-1"), ("lora_rank", "-1"), ("lora_alpha", "0"),
                ("lora_dropout", "1.0"), ("pad_multiple", "0"), ("seed", "-1"), ("log_interval", "0"), ("ckpt_interval", "-1"),
                ("keep_last", "-1"), ("max_new_tokens", "0"), ("temperature", "-1"), ("top_k", "-1"), ("loss_on", "prompt"),
                ("loss", "ipo"), ("ref_mode", "sometimes"), ("schedule", "linear"), ("dtype", "fp16"), ("device", "tpu")]


def test_settings_are_range_checked_up_front(tmp_path, capsys):
    missing = str(tmp_path / "missing.pt")  # checked before the checkpoint is read: no checkpoint error
    for key, value in BAD_SETTINGS:
        err = one_line_error(["dpo", missing, f"--{key}={value}"], capsys)
        assert err.startswith(f"error: {key}=") and ": must be " in err, (key, err)  # the key, the value given, its range
    assert "[0, 1]" in one_line_error(["sft", missing, "--warmup_frac=2"], capsys)
    assert "lora_targets" in one_line_error(["sft", missing, "--lora_rank=4", "--lora_targets=q,qq"], capsys)
    err = one_line_error(["--max_new_tokens", "0", "--answers", str(tmp_path / "a.jsonl")], capsys, main=judge.main)
    assert "--max_new_tokens must be >= 1" in err
    # every numeric field of PostTrainConfig declares its range beside it, and the defaults are in it
    declared = {f.name: f.metadata["must"] for f in fields(pt.PostTrainConfig) if "ok" in f.metadata}
    choices = {k for k, must in declared.items() if must.startswith("one of ")}
    numeric = {f.name for f in fields(pt.PostTrainConfig) if f.type in (int, float)}
    assert numeric == set(declared) - choices and choices < {f.name for f in fields(pt.PostTrainConfig)}
    check_config(pt.PostTrainConfig(device="cpu"))
    pt.resolve("dpo", pt.PostTrainConfig(device="cpu"))


def test_malformed_data_is_one_line(base_ckpt, tmp_path, capsys):
    rows = chat_data.load_rows(DPO_DATA, "train_prefs", ["chosen", "rejected"])[:6]
    lines = [json.dumps(r) for r in rows]
    cases = []
    (tmp_path / "broken.jsonl").write_text("\n".join(lines[:2] + [lines[2][:-7]] + lines[3:]) + "\n")  # line 3 cut short
    cases.append(("broken.jsonl", ["broken.jsonl line 3 is not JSON"]))
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    cases.append(("binary.jsonl", ["binary.jsonl is not UTF-8 text", "binary"]))
    (tmp_path / "array.jsonl").write_text("\n".join(lines[:1] + ["[1, 2]"]) + "\n")
    cases.append(("array.jsonl", ["array.jsonl line 2 is a JSON list, not an object"]))
    write_jsonl(tmp_path / "gap.jsonl", rows[:4] + [{k: v for k, v in rows[4].items() if k != "rejected"}] + rows[5:])
    cases.append(("gap.jsonl", ["gap.jsonl row 4: no column 'rejected'", "ultrafeedback_binarized"]))
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 not really")
    cases.append(("fake.parquet", ["fake.parquet is not a readable Parquet file"]))
    write_jsonl(tmp_path / "string.jsonl", [{"messages": "Hi there"}])
    for name, expected in cases:
        err = one_line_error(["dpo", base_ckpt, f"--data={tmp_path / name}", f"--out={tmp_path / 'o'}", "--device=cpu"], capsys)
        assert all(e in err for e in expected), err
    err = one_line_error(["sft", base_ckpt, f"--data={tmp_path / 'string.jsonl'}", f"--out={tmp_path / 'o'}", "--device=cpu"], capsys)
    assert "row 0" in err and "list" in err
    # judge.py: answers to grade, questions to answer
    err = one_line_error(["--answers", str(tmp_path / "broken.jsonl"), "--judge_url", "http://127.0.0.1:9/v1"], capsys, main=judge.main)
    assert "broken.jsonl line 3 is not JSON" in err
    write_jsonl(tmp_path / "answers.jsonl", [{"prompt_id": 1, "category": "math", "turns": ["What is 1+1?", "And 2+2?"]}])
    err = one_line_error(["--answers", str(tmp_path / "answers.jsonl"), "--judge_url", "http://127.0.0.1:9/v1"], capsys, main=judge.main)
    assert "row 0: no column 'answers'" in err
    err = one_line_error([base_ckpt, "--questions", str(tmp_path / "binary.jsonl"), "--device=cpu"], capsys, main=judge.main)
    assert "not UTF-8 text" in err


# -----------------------------------------------------------------------------
# MT-Bench judging against a local OpenAI-compatible server (loopback only)


class FakeJudge(http.server.BaseHTTPRequestHandler):
    """Scripted replies per (question, turn); every request is recorded."""
    script, seen, requests = {}, {}, []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        text = "\n".join(m["content"] for m in body["messages"])
        turn = 2 if "second user question" in text else 1
        key = next(k for k in FakeJudge.script if k[0] in text and k[1] == turn)
        n = FakeJudge.seen[key] = FakeJudge.seen.get(key, 0) + 1
        replies = FakeJudge.script[key]
        status, content = replies[min(n, len(replies)) - 1]
        payload = content.encode() if status == "raw" else json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(500 if status == 500 else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def judge_server(script):
    FakeJudge.script, FakeJudge.seen, FakeJudge.requests = script, {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_judge_client_parsing_retries_and_scores(tmp_path, monkeypatch, capsys):
    questions = judge.load_questions(MT_DATA)
    assert [len(q["turns"]) for q in questions] == [2, 2, 2, 2]
    answers = judge.generate_answers(tiny().eval(), TOK, questions[:1], max_new_tokens=4)
    assert len(answers[0]["answers"]) == 2 and all(isinstance(a, str) for a in answers[0]["answers"])
    rows = [{**q, "answers": [f"answer one to {q['category']}", f"answer two to {q['category']}"]} for q in questions]
    ok = lambda s: (200, s)
    script = {("two-line poem", 1): [ok("Good. Rating: [[8]]")],
              ("two-line poem", 2): [ok("no rating here"), ok("Fine. [[6]]")],                  # malformed, then fine
              ("12 plus 30", 1): [(500, "overloaded"), ok("[[9.5]]")],                        # HTTP error, then fine
              ("12 plus 30", 2): [("raw", "{not json")],                                       # always broken: failed
              ("Tom is a cat", 1): [ok("Rating: [[11]]")],                                     # out of range: failed
              ("Tom is a cat", 2): [ok("Rating: [7]")],                                        # MT-Bench's fallback form
              ("Hamlet", 1): [ok("[[4]]")], ("Hamlet", 2): [ok("[[5]]")]}
    with judge_server(script) as url:
        judgments = judge.grade(rows, url, "judge-x", api_key="test-key", attempts=3, backoff=0.0, log=lambda *a: None)
        reqs = list(FakeJudge.requests)
        monkeypatch.setenv("MY_JUDGE_KEY", "env-key")
        answers_path = tmp_path / "answers.jsonl"
        answers_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = judge.main(["--answers", str(answers_path), "--judge_url", url, "--judge_model", "judge-y",
                              "--judge_key_env", "MY_JUDGE_KEY", "--judge_backoff", "0"])
        assert FakeJudge.requests[-1]["auth"] == "Bearer env-key" and FakeJudge.requests[-1]["body"]["model"] == "judge-y"
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer test-key" for r in reqs)
    assert all(r["body"]["model"] == "judge-x" and r["body"]["temperature"] == 0 for r in reqs)
    turn2_math = next(r for r in reqs if "second user question" in json.dumps(r["body"]) and "12 plus 30" in json.dumps(r["body"]))
    text = json.dumps(turn2_math["body"])
    assert "Multiply that by 2." in text and "answer one to math" in text and "answer two to math" in text and "Reference answer" in text
    by = {(j["category"], j["turn"]): j for j in judgments}
    assert by[("writing", 1)]["score"] == 8 and by[("writing", 2)]["score"] == 6 and by[("writing", 2)]["attempts"] == 2
    assert by[("math", 1)]["score"] == 9.5 and by[("reasoning", 2)]["score"] == 7
    for key in (("math", 2), ("reasoning", 1)):  # bounded retries, then failed: never a score
        assert by[key]["status"] == "failed" and by[key]["score"] is None and by[key]["attempts"] == 3 and by[key]["error"]
    assert len(reqs) == 1 + 2 + 2 + 3 + 3 + 1 + 1 + 1
    s = judge.aggregate(judgments)
    assert s["graded"] == 6 and s["failed"] == 2 and s["score"] == pytest.approx((8 + 6 + 9.5 + 7 + 4 + 5) / 6)
    assert s["turn1"] == pytest.approx((8 + 9.5 + 4) / 3) and s["turn2"] == pytest.approx((6 + 7 + 5) / 3)
    assert s["categories"]["math"] == {"turn1": 9.5, "turn2": None, "score": 9.5, "graded": 1, "failed": 1}
    assert s["questions"][str(questions[1]["prompt_id"])] == {"category": "math", "turn1": 9.5, "turn2": None}
    assert summary["score"] == pytest.approx(s["score"]) and json.load(open(tmp_path / "scores.json"))["failed"] == 2
    printed = capsys.readouterr().out
    assert "MT-Bench" in printed and "math" in printed and len((tmp_path / "judgments.jsonl").read_text().splitlines()) == 8


def test_divergence_and_relaunch_are_handled_as_in_pretraining(base_ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sft"
    common = ["sft", base_ckpt, "configs/sft_tiny.py", f"--out={out}", "--ckpt_interval=3", "--keep_last=0",
              "--log_interval=1", "--plot=false", "--eval_data=none", "--lr=1e-4"]
    pt.main(common + ["--max_steps=6"])
    good = {p: open(p, "rb").read() for p in checkpoint_paths(out) + [str(out / "final.pt")]}
    # a relaunch without --resume is refused: the folder holds a run
    err = one_line_error(common + ["--max_steps=6"], capsys)
    assert "--resume" in err and "--overwrite" in err, err
    assert {p: open(p, "rb").read() for p in good} == good
    # the loop shape of train.py, the same guarantee: from the 5th step on the gradients turn NaN (as after
    # an overflow); the run stops before stepping on them, names the last good checkpoint, and saves no NaN
    calls, accumulate = [], pt.sft_accumulate

    def poisoned(model, *a, **k):
        loss, n = accumulate(model, *a, **k)
        calls.append(1)
        if len(calls) >= 5:
            for p in model.parameters():
                p.grad.fill_(float("nan"))
        return loss, n

    monkeypatch.setattr(pt, "sft_accumulate", poisoned)
    err = one_line_error(common + ["--max_steps=12", "--overwrite"], capsys)
    assert "step 5: " in err and "not finite" in err and "last good checkpoint is" in err and "ckpt_0000003.pt" in err, err
    assert [os.path.basename(p) for p in checkpoint_paths(out)] == ["ckpt_0000003.pt"]
    assert all(torch.isfinite(t).all() for t in load_checkpoint(checkpoint_paths(out)[0])["model"].values())
    calls.clear()
    err = one_line_error(common + ["--max_steps=12", "--overwrite", "--divergence=skip", "--max_skips=2"], capsys)
    assert "after 2 skipped updates" in err, err
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl")) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if r.get("event") == "skip"] == [5, 6]
    monkeypatch.setattr(pt, "sft_accumulate", accumulate)
    # --overwrite replaces the old run; --resume into a folder with nothing saved yet starts fresh
    pt.main(common + ["--max_steps=3", "--overwrite"])
    assert load_checkpoint(out / "final.pt")["step"] == 3
    fresh = [a if not a.startswith("--out=") else f"--out={tmp_path / 'fresh'}" for a in common]
    pt.main(fresh + ["--max_steps=3", "--resume"])
    assert load_checkpoint(tmp_path / "fresh" / "final.pt")["step"] == 3
