"""train.py: configuration errors (a series' keys refused), the LR schedule's edges, AdamW's state keyed by parameter
name, exact resume after a kill and from an old integer-keyed checkpoint, and DDP under torchrun matching one process
over the same global batch."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields, replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import parallel  # noqa: E402
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from common import ConfigError, configure, decay_groups, lr_at, make_optimizer  # noqa: E402
from train import SERIES_KEYS, TrainConfig  # noqa: E402
from model import Llama, ModelConfig  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # one small preparation of the embedded corpus, shared by the runs below
    return str(tmp_path_factory.mktemp("data"))


def run_args(out_dir, data_dir, **overrides):
    base = dict(shape="cpu-1", data_dir=data_dir, max_data_tokens=300_000, batch_size=4, seq_len=64,
                max_steps=30, lr=3e-3, warmup_steps=5, eval_interval=1000, eval_batches=2, ckpt_interval=5,
                log_interval=1, keep_last=2, plot=False, out_dir=str(out_dir))
    base.update(overrides)
    return [f"--{k}={v}" for k, v in base.items()]


def train_losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_config_errors_name_the_key(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nlr = 2e-3\nbatch_size = 8\n")
    c = configure(TrainConfig, [str(cfg), "--seq_len=128", "--resume", "--data=['a.txt', 'b.txt']"])
    assert (c.lr, c.batch_size, c.seq_len, c.resume, c.data) == (2e-3, 8, 128, True, ["a.txt", "b.txt"])
    assert configure(TrainConfig, ["--data=hf:HuggingFaceFW/fineweb-edu:sample-10BT"]).data == ["hf:HuggingFaceFW/fineweb-edu:sample-10BT"]
    with pytest.raises(ConfigError, match="unknown config key 'lrr'"):
        configure(TrainConfig, ["--lrr=1"])
    cfg.write_text("batch_sise = 8\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_sise' in .*c\.py"):
        configure(TrainConfig, [str(cfg)])
    with pytest.raises(ConfigError, match="'max_steps' .* must be int, got str"):
        configure(TrainConfig, ["--max_steps=many"])
    with pytest.raises(ConfigError, match="'lr' .* must be float, got bool"):
        configure(TrainConfig, ["--lr=True"])
    out = subprocess.run([sys.executable, "train.py", "--lrr=1"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and out.stderr.strip().startswith("error: unknown config key 'lrr'") and "\n" not in out.stderr.strip()


def test_lr_schedule_edges():
    # warmup rises linearly to the peak, cosine ends exactly at min_lr on the last step
    lrs = [lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    # the anchors' pitfalls: warmup as long as the run, a single step, accumulation: finite and positive
    for max_steps, warmup in [(10, 10), (10, 20), (1, 0), (1, 1), (2, 1)]:
        for s in range(max_steps):
            for sched in ("cosine", "wsd", "constant"):
                v = lr_at(s, max_steps, 1.0, warmup, sched)
                assert math.isfinite(v) and 0 < v <= 1.0
    wsd = [lr_at(s, 100, 1.0, 0, "wsd", decay_frac=0.2) for s in range(100)]
    assert wsd[79] == 1.0 and wsd[80] < 1.0 and wsd[-1] == pytest.approx(0.1)
    assert lr_at(200, 100, 1.0, 10) == pytest.approx(0.1)  # past the end: clamped, not negative


def test_no_weight_decay_on_norms_and_embeddings():
    for tie in (False, True):
        model = Llama(ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, tie_embeddings=tie))
        decay, no_decay = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu")).param_groups
        names = {id(p): n for n, p in model.named_parameters()}
        assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if "norm" in n or "embed" in n}
        assert ("lm_head.weight" in {names[id(p)] for p in decay["params"]}) == (not tie)
        assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_adamw_is_fused_on_the_cpu_and_equals_a_float64_recomputation():
    # make_optimizer takes torch's fused AdamW kernel on the CPU too; its steps against AdamW written out in float64
    # (Loshchilov and Hutter 2019, Algorithm 2: decoupled weight decay, then the bias-corrected Adam update)
    torch.manual_seed(0)
    model = Llama(ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64, tie_embeddings=False))
    lr, wd, (b1, b2), eps = 1e-2, 0.1, (0.9, 0.95), 1e-8
    opt = make_optimizer(model, lr, wd, (b1, b2), torch.device("cpu"))
    assert opt.defaults["fused"] is True
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    ref = {n: (p.detach().double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64))
           for n, p in model.named_parameters()}
    for t in range(1, 6):
        for n, p in model.named_parameters():
            p.grad = torch.randn_like(p)
            w, m, v = ref[n]
            g = p.grad.double()
            w.mul_(1 - lr * decays[id(p)])
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(b2).add_((1 - b2) * g * g)
            w.sub_(lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps))
        opt.step()
    for n, p in model.named_parameters():
        assert (p.detach().double() - ref[n][0]).abs().max().item() < 1e-6, n


def test_killed_run_resumes_bit_for_bit(tmp_path, data_dir):
    # bit for bit on the CPU, which this checks; on CUDA only with deterministic=true (README), which needs a GPU to check
    # (bench/gpu_check.py's resume part)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run([sys.executable, "train.py", *run_args(full, data_dir)], cwd=ROOT, check=True, capture_output=True)
    # the same run, killed (SIGKILL: no cleanup) once it has logged step 12, i.e. after the step-10 checkpoint
    proc = subprocess.Popen([sys.executable, "train.py", *run_args(killed, data_dir)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and max(train_losses(killed) or [0]) >= 12:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "final.pt").exists()
    subprocess.run([sys.executable, "train.py", *run_args(killed, data_dir), "--resume"], cwd=ROOT, check=True, capture_output=True)
    expected, got = train_losses(full), train_losses(killed)
    assert sorted(got) == sorted(expected) == list(range(1, 31))
    assert all(got[s] == expected[s] for s in expected), [(s, got[s], expected[s]) for s in expected if got[s] != expected[s]]
    a = torch.load(full / "final.pt", weights_only=False)
    b = torch.load(killed / "final.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["step"] == b["step"] == 30 and a["flops"] == b["flops"]
    # only the last keep_last periodic checkpoints remain
    assert sorted(p.name for p in killed.glob("ckpt_*.pt")) == ["ckpt_0000025.pt", "ckpt_0000030.pt"]


def test_ddp_two_ranks_match_one_process(tmp_path, data_dir):
    # one process with grad_accum=2 reads exactly the rows that 2 ranks with grad_accum=1 read
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = dict(max_steps=6, ckpt_interval=100, eval_interval=3)
    subprocess.run([sys.executable, "train.py", *run_args(single, data_dir, grad_accum=2, **common)], cwd=ROOT, check=True, capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                          *run_args(ddp, data_dir, grad_accum=1, **common)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    a, b = train_losses(single), train_losses(ddp)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-6
    val = lambda d: [json.loads(l)["val_loss"] for l in open(d / "metrics.jsonl") if "val_loss" in l]
    assert len(val(single)) == 3 and max(abs(x - y) for x, y in zip(val(single), val(ddp))) < 1e-6


def test_last_step_evaluates_and_saves_off_interval(tmp_path, data_dir):
    out = tmp_path / "odd"
    subprocess.run([sys.executable, "train.py", *run_args(out, data_dir, max_steps=7, eval_interval=5, ckpt_interval=5, plot=True)],
                   cwd=ROOT, check=True, capture_output=True)
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 5, 7]
    assert torch.load(out / "final.pt", weights_only=False)["step"] == 7
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_series_that_cannot_grow_fails_before_training(tmp_path):
    cfg = tmp_path / "series.py"
    cfg.write_text(f"out_dir = {str(tmp_path / 'out')!r}\n"
                   "stages = [dict(name='a', shape='cpu-2', lr=1e-3), dict(name='b', shape='cpu-1', lr=1e-3)]\n")
    out = subprocess.run([sys.executable, "series.py", str(cfg)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: stages: ")
    assert "smaller" in out.stderr and not (tmp_path / "out").exists()


def test_train_py_refuses_series_keys_with_one_line_pointing_to_series_py(tmp_path):
    # train.py parses TrainConfig alone: a series' key, in a config file or on the command line, would be ignored
    # there, so it is refused before anything runs, with the command that runs it
    cfg = tmp_path / "series.py"
    cfg.write_text(f"out_dir = {str(tmp_path / 'out')!r}\nstages = [dict(name='a', shape='cpu-1', lr=1e-3)]\n")
    for argv in (["configs/tiny_cpu.py", f"--out_dir={tmp_path / 'out'}", "--grow_noise=0.1"], [str(cfg)]):
        out = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: config key "), out.stderr
        assert "python series.py " + argv[0] in out.stderr and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="'tokens_per_param' in --tokens_per_param is series.py's"):
        configure(TrainConfig, ["--tokens_per_param=10"], SERIES_KEYS, "series.py")
    # the list is series.SeriesConfig's own keys (train.py sits below series.py and cannot import it)
    import series
    assert set(SERIES_KEYS) == {f.name for f in fields(series.SeriesConfig)} - {f.name for f in fields(TrainConfig)}
    imported = subprocess.run([sys.executable, "-c", "import sys, train; print('series' in sys.modules)"], cwd=ROOT,
                              capture_output=True, text=True)
    assert imported.stdout.strip() == "False", imported.stderr


def test_adamw_state_is_keyed_by_name_and_loads_back(tmp_path):
    # parallel.optimizer_state names each parameter (model.named_parameters()); load_optimizer_state puts every
    # moment back on its parameter, converts an old integer-keyed state, and refuses one that does not fit
    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64)
    model = Llama(config)
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    for _ in range(2):
        model(*torch.randint(0, 64, (2, 2, 8)))[1].backward()
        opt.step()
    state = parallel.optimizer_state(model, opt)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(state["state"]) == sorted(names) and sorted(n for g in state["param_groups"] for n in g["params"]) == sorted(names)
    old = opt.state_dict()  # torch's own, as checkpoints were written before: parameters numbered in group order
    for loaded in (state, old):
        fresh = Llama(config)
        fresh_opt = make_optimizer(fresh, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
        parallel.load_optimizer_state(fresh, fresh_opt, loaded)
        got = parallel.optimizer_state(fresh, fresh_opt)
        for n in names:
            assert all(torch.equal(got["state"][n][k], state["state"][n][k]) for k in ("step", "exp_avg", "exp_avg_sq")), n
    other = Llama(replace(config, d_model=48, n_heads=3, n_kv_heads=3))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        parallel.load_optimizer_state(other, make_optimizer(other, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu")), state)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        parallel.load_optimizer_state(fresh, fresh_opt, None)
    # a state with no moments yet (a checkpoint after steps whose updates were all skipped as non-finite) loads as a fresh
    # AdamW with the saved settings, and training goes on from it as from a fresh one
    empty = {"state": {}, "param_groups": [{**g, "lr": 5e-4} for g in state["param_groups"]]}
    fresh = Llama(config)
    fresh_opt = make_optimizer(fresh, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    parallel.load_optimizer_state(fresh, fresh_opt, empty)
    assert not fresh_opt.state and [g["lr"] for g in fresh_opt.param_groups] == [5e-4] * len(fresh_opt.param_groups)
    assert [g["weight_decay"] for g in fresh_opt.param_groups] == [g["weight_decay"] for g in state["param_groups"]]
    parallel.load_optimizer_state(fresh, fresh_opt, {**empty, "param_groups": state["param_groups"]}, own_settings=True)
    assert [g["lr"] for g in fresh_opt.param_groups] == [5e-4] * len(fresh_opt.param_groups)  # the live settings stay


def test_a_checkpoint_with_the_old_integer_keyed_adamw_state_resumes_bit_for_bit(tmp_path, data_dir):
    out = tmp_path / "run"
    args = run_args(out, data_dir, max_steps=10, ckpt_interval=5, keep_last=0)
    subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, check=True, capture_output=True)
    expected, final = train_losses(out), load_checkpoint(out / "final.pt")
    ckpt = load_checkpoint(out / "ckpt_0000005.pt")
    model = model_from_checkpoint(ckpt)
    names = [n for n, _ in model.named_parameters()]
    assert set(ckpt["optimizer"]["state"]) == set(names)  # written by parameter name
    # rewrite the step-5 checkpoint's AdamW state as checkpoints stored it before (numbered in decay_groups' order),
    # drop what came after it, and resume: the same losses and weights, bit for bit
    index = {n: i for i, n in enumerate(n for group in decay_groups(model) for n in group)}
    ckpt["optimizer"] = {"state": {index[n]: e for n, e in ckpt["optimizer"]["state"].items()},
                         "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in ckpt["optimizer"]["param_groups"]]}
    save_checkpoint(ckpt, out / "ckpt_0000005.pt")
    for name in ("ckpt_0000010.pt", "final.pt"):
        (out / name).unlink()
    subprocess.run([sys.executable, "train.py", *args, "--resume"], cwd=ROOT, check=True, capture_output=True)
    assert train_losses(out) == expected
    resumed = load_checkpoint(out / "final.pt")
    assert resumed["step"] == 10 and all(torch.equal(resumed["model"][k], final["model"][k]) for k in final["model"])
    assert all(torch.equal(resumed["optimizer"]["state"][n][k], final["optimizer"]["state"][n][k])
               for n in names for k in ("step", "exp_avg", "exp_avg_sq"))


def test_mixture_logs_validation_loss_per_source(tmp_path, data_dir):
    # two local sources mixed 3:1 by tokens (the Weblab-10B setting, Matsuo Lab 2023), each with its own val loss
    import data
    for name, word in (("en", "the quick brown fox jumps over the lazy dog. "), ("ja", "いろはにほへと ちりぬるを わかよたれそ. ")):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(400):
                f.write(json.dumps({"text": f"{i} " + word * 8}) + "\n")
    out = tmp_path / "mix"
    subprocess.run([sys.executable, "train.py", *run_args(out, str(tmp_path / "cache"), max_steps=4, eval_interval=2),
                    f"--data=['{tmp_path / 'en.jsonl'}', '{tmp_path / 'ja.jsonl'}']", "--data_names=['en', 'ja']",
                    "--data_weights=[3, 1]", "--max_data_tokens=0"], cwd=ROOT, check=True, capture_output=True)
    vals = [json.loads(l) for l in open(out / "metrics.jsonl") if "val_loss" in l]
    assert [v["step"] for v in vals] == [0, 2, 4]
    for v in vals:
        assert {"val_loss/en", "val_loss/ja", "val_bpb/en", "val_bpb/ja"} <= set(v)
        assert v["val_loss"] == pytest.approx((3 * v["val_loss/en"] + v["val_loss/ja"]) / 4)
    # the per-source losses are each source's own: recompute the final one from the saved model
    from checkpoint import load_checkpoint, model_from_checkpoint
    model = model_from_checkpoint(load_checkpoint(out / "final.pt")).eval()
    for name in ("en", "ja"):
        batches = data.val_batches(str(tmp_path / "cache" / f"{name}-bytes"), 4, 64, 2)
        with torch.no_grad():
            losses = [(model(x, y)[1].item(), y.numel()) for x, y in batches]
        expected = sum(l * n for l, n in losses) / sum(n for _, n in losses)
        assert abs(vals[-1][f"val_loss/{name}"] - expected) < 1e-5
    assert vals[-1]["val_loss/en"] != vals[-1]["val_loss/ja"]
