"""FSDP2 (train.py --parallel=fsdp) on 2 CPU ranks with gloo under torchrun, and the GPU plan around it:
- FSDP trains as one process does over the same global batch: losses, gradient norms (clipping over
  sharded gradients), validation and final weights within float32 rounding; untied with gradient
  accumulation, tied with activation checkpointing;
- an FSDP run killed by SIGKILL resumes exactly; a diverging one stops with one error line and saves
  nothing non-finite;
- its checkpoints are today's single file: one process loads, grows and exports them, their optimizer
  state has the layout a single process writes (keyed by parameter name), and DDP and FSDP resume each other's checkpoints;
- budget.py's activation formula against the bytes torch saves for backward, and the memory plan;
- the CPU matmul peak measured once and cached; bench_gpu.py's CPU smoke test and its refusal without CUDA.
Each torchrun launch costs seconds, so the runs are shared by a module-scoped fixture."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import budget  # noqa: E402
import common  # noqa: E402
import grow  # noqa: E402
import parallel  # noqa: E402
from checkpoint import checkpoint_paths, load_checkpoint, model_from_checkpoint  # noqa: E402
from hf import export_hf, import_hf  # noqa: E402
from model import Llama, ModelConfig  # noqa: E402
from test_train import run_args, train_losses  # noqa: E402  (the same small runs as the DDP and resume tests)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# shared by the runs below: 24 steps, a checkpoint every 8 (all kept), validation every 8 on 3 batches
# (2 ranks: one rank evaluates 2, the other 1 and must still join each FSDP forward)
RUN = dict(max_steps=24, ckpt_interval=8, keep_last=0, eval_interval=8, eval_batches=3, warmup_steps=2)


def single(out_dir, data_dir, **overrides):
    out = subprocess.run([sys.executable, "train.py", *run_args(out_dir, data_dir, **overrides)], cwd=ROOT, capture_output=True,
                         text=True, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]


def torchrun_cmd(script, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *args]


def torchrun(out_dir, data_dir, *extra, **overrides):
    out = subprocess.run(torchrun_cmd("train.py", *run_args(out_dir, data_dir, **overrides), *extra), cwd=ROOT,
                         capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]


def rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def final(out_dir):
    return load_checkpoint(os.path.join(out_dir, "final.pt"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """cpu-1 (untied), 2 ranks x grad_accum 2 under FSDP, and one process x grad_accum 4: the same 16 rows
    per step."""
    root = tmp_path_factory.mktemp("runs")
    torchrun(root / "fsdp", data_dir, parallel="fsdp", grad_accum=2, **RUN)
    single(root / "single", data_dir, grad_accum=4, **RUN)
    return root


def assert_same_training(a, b, tol=1e-5):
    """Two runs over the same batches: losses, gradient norms, validation losses and final weights agree."""
    ra, rb = rows(a), rows(b)
    pick = lambda rs, key: {r["step"]: r[key] for r in rs if key in r}
    for key in ("loss", "grad_norm", "val_loss"):
        x, y = pick(ra, key), pick(rb, key)
        assert sorted(x) == sorted(y) and x, key
        assert max(abs(x[s] - y[s]) / max(1.0, abs(x[s])) for s in x) < tol, (key, x, y)
    wa, wb = final(a)["model"], final(b)["model"]
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < tol


def test_fsdp_matches_one_process_with_accumulation(runs):
    # FSDP with grad_accum 2 (a reduce-scatter after each micro-step) against one process
    assert_same_training(runs / "single", runs / "fsdp")
    # the optimizer state is written in the single process's layout (keyed by parameter name), with the same moments
    a, b = final(runs / "single")["optimizer"], final(runs / "fsdp")["optimizer"]
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]
    assert [{k: v for k, v in g.items() if k != "params"} for g in a["param_groups"]] == \
        [{k: v for k, v in g.items() if k != "params"} for g in b["param_groups"]]
    assert list(a["state"]) == list(b["state"]) == [name for g in a["param_groups"] for name in g["params"]]
    assert set(a["state"]) == {name for name, _ in model_from_checkpoint(final(runs / "single")).named_parameters()}
    for i in a["state"]:
        assert a["state"][i]["step"] == b["state"][i]["step"] == 24
        for k in ("exp_avg", "exp_avg_sq"):
            assert a["state"][i][k].shape == b["state"][i][k].shape
            x, y = a["state"][i][k], b["state"][i][k]
            assert (x - y).abs().max() <= 1e-4 * x.abs().max()  # float32 rounding, relative to the moment's scale


def test_fsdp_tied_with_activation_checkpointing_matches_one_process(tmp_path, data_dir):
    # pu1 ties its embeddings: the tied matrix is one parameter of the root's group, saved as one tensor
    tied = dict(shape="pu1", max_steps=4, eval_interval=2, eval_batches=3, ckpt_interval=4, warmup_steps=2)
    single(tmp_path / "single", data_dir, grad_accum=2, **tied)
    torchrun(tmp_path / "fsdp", data_dir, parallel="fsdp", activation_checkpointing=True, grad_accum=1, **tied)
    assert_same_training(tmp_path / "single", tmp_path / "fsdp")
    state = final(tmp_path / "fsdp")["model"]
    assert state["lm_head.weight"] is state["embed_tokens.weight"]  # one tensor in the file, as a single process saves it
    # and one AdamW entry, under the name a single process gives it
    assert list(final(tmp_path / "fsdp")["optimizer"]["state"]) == list(final(tmp_path / "single")["optimizer"]["state"])


def test_fsdp_with_activation_checkpointing_compiles_each_block_and_matches_one_process(tmp_path, data_dir):
    # the paper's 8B stage's setting (FSDP, activation checkpointing, torch.compile with inductor) on 2 ranks: every block's
    # forward compiled (one graph all blocks share, checkpointed inside it) between FSDP's hooks, none broken; before, the
    # checkpoint wrapper put a dynamo-disabled call at the top of each compiled block and nothing was compiled
    run = dict(max_steps=4, eval_interval=2, eval_batches=3, ckpt_interval=4, warmup_steps=2)
    single(tmp_path / "single", data_dir, grad_accum=2, **run)
    torchrun(tmp_path / "fsdp", data_dir, parallel="fsdp", activation_checkpointing=True, compile="true", grad_accum=1, **run)
    assert_same_training(tmp_path / "single", tmp_path / "fsdp", tol=1e-4)  # inductor's fused kernels round differently
    graphs = [r["graphs"] for r in rows(tmp_path / "fsdp") if "loss" in r]
    assert graphs[0] == 2 and graphs[-1] == 2  # the evaluation's (step 0), the training step's; none compiled after step 1
    assert [r["tok_s"] is None for r in rows(tmp_path / "fsdp") if "loss" in r][:2] == [True, False]  # compiling, untimed


def kill_run(out_dir):
    """SIGKILL every process of the torchrun launch writing to out_dir (the workers run in sessions of their own)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if f"--out_dir={out_dir}".encode() in cmdline and int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def test_killed_fsdp_run_resumes_exactly(runs, data_dir):
    # exactly on CPU ranks, as here; on CUDA ranks only with deterministic=true (README), unchecked without a GPU
    killed = runs / "killed"
    proc = subprocess.Popen(torchrun_cmd("train.py", *run_args(killed, data_dir, parallel="fsdp", grad_accum=2, **RUN)),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").exists() and max(train_losses(killed) or [0]) >= 10:  # after the step-8 checkpoint
            kill_run(killed)
            break
        time.sleep(0.01)
    proc.wait()
    assert not (killed / "final.pt").exists(), "the run finished before it could be killed"
    torchrun(killed, data_dir, "--resume", parallel="fsdp", grad_accum=2, **RUN)
    expected, got = train_losses(runs / "fsdp"), train_losses(killed)
    assert sorted(got) == sorted(expected) == list(range(1, 25))
    assert all(got[s] == expected[s] for s in expected), [(s, got[s], expected[s]) for s in expected if got[s] != expected[s]]
    a, b = final(runs / "fsdp"), final(killed)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
               for i in a["optimizer"]["state"])


def test_ddp_and_fsdp_resume_each_others_checkpoints(runs, data_dir):
    # FSDP's step-8 checkpoint resumed under DDP, whose step-16 checkpoint is resumed under FSDP again
    ddp, fsdp = runs / "fsdp_then_ddp", runs / "ddp_then_fsdp"
    ddp.mkdir()
    for name in ("ckpt_0000008.pt", "metrics.jsonl"):
        shutil.copy(runs / "fsdp" / name, ddp / name)
    torchrun(ddp, data_dir, "--resume", parallel="ddp", grad_accum=2, **RUN)
    fsdp.mkdir()
    for name in ("ckpt_0000016.pt", "metrics.jsonl"):
        shutil.copy(ddp / name, fsdp / name)
    torchrun(fsdp, data_dir, "--resume", parallel="fsdp", grad_accum=2, **RUN)
    # each continues the uninterrupted FSDP run: a fresh optimizer or a lost moment would not
    for out in (ddp, fsdp):
        assert_same_training(runs / "fsdp", out)
        assert final(out)["optimizer"]["state"]["embed_tokens.weight"]["step"] == 24


def test_series_under_fsdp_grows_between_sharded_stages(tmp_path, data_dir):
    # stage 1 is gathered into final.pt, grown on the host by rank 0 alone, and the grown model sharded again for
    # stage 2, which starts at the validation loss stage 1 ended with (fpi/zero growth keeps the function): the
    # other ranks, which grew nothing, received rank 0's weights and its grown AdamW state (step counts carried;
    # a fresh optimizer is the same path with no state to send)
    out = tmp_path / "series"
    config = tmp_path / "series_fsdp.py"
    config.write_text("stages = [dict(name='a', shape='cpu-1', lr=3e-3), dict(name='b', shape='cpu-2', lr=2e-3)]\n"
                      "tokens_per_param = 0.1\nseries_mode = 'grow'\nbatch_size = 4\nseq_len = 64\nmax_data_tokens = 300_000\n"
                      "warmup_steps = 2\ngrow_warmup_steps = 2\neval_interval = 100\neval_batches = 3\nplot = False\n"
                      "report = False\nparallel = 'fsdp'\ngrow_schedule = 'continue'\ngrow_optimizer = 'grown'\n"
                      f"out_dir = {str(out)!r}\ndata_dir = {data_dir!r}\n")
    res = subprocess.run(torchrun_cmd("series.py", str(config)), cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    val = lambda stage: [r["val_loss"] for r in rows(out / "grow" / stage) if "val_loss" in r]
    assert abs(val("b")[0] - val("a")[-1]) < 1e-5
    assert [r["stage"] for r in json.load(open(out / "series.json"))["runs"]] == ["a", "b"]
    a, b = final(out / "grow" / "a"), final(out / "grow" / "b")
    assert b["optimizer"]["state"]["embed_tokens.weight"]["step"] == a["step"] + b["step"]  # the embedding's AdamW steps, carried


def test_fsdp_divergence_stops_with_one_line_and_saves_nothing_non_finite(tmp_path, data_dir):
    out = tmp_path / "diverge"
    res = subprocess.run(torchrun_cmd("train.py", *run_args(out, data_dir, parallel="fsdp", lr=1e3, grad_clip=0.0, max_steps=60,
                                                            ckpt_interval=5, divergence="skip", max_skips=2)),
                         cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("is not finite after 2 skipped updates" in e for e in errors), res.stderr[-2000:]
    assert 'train.py", line' not in res.stderr  # no traceback through nanogrow's code, on any rank
    for path in checkpoint_paths(out):
        ckpt = load_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_fsdp_checkpoint_loads_grows_and_exports_in_one_process(runs, tmp_path):
    ckpt = final(runs / "fsdp")
    model = model_from_checkpoint(ckpt).eval()
    # it is the model the single process trained (within float32 rounding)
    reference = model_from_checkpoint(final(runs / "single")).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx)[0] - reference(idx)[0]).abs().max() < 1e-4
    target = replace(model.config, d_model=96, n_heads=6, n_kv_heads=6, ffn_dim=256, n_layers=3)
    grown, gap = grow.grow_checkpoint(ckpt, target, width="fpi", depth="zero", seed=0, noise=1e-3)
    assert gap < 1e-4
    big = model_from_checkpoint(grown).eval()
    with torch.no_grad():  # function preserving: the grown model computes what the FSDP-trained one did
        assert (big(idx)[0] - model(idx)[0]).abs().max() < 1e-4
    export_hf(big, tmp_path / "hf", tokenizer=ckpt["tokenizer"])
    back, _ = import_hf(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(back.eval()(idx)[0], big(idx)[0])


# -----------------------------------------------------------------------------
# the memory plan (budget.py --memory)


def saved_bytes(config, precision, batch=2, seq=32, checkpointed=False):
    """Bytes autograd keeps for backward over one forward of `config` (each storage once; weights and
    buffers left out, except the copies autocast makes of them)."""
    torch.manual_seed(0)
    model = Llama(config)
    if checkpointed:
        parallel.checkpoint_blocks(model)
    if precision == "bf16":
        model = model.to(torch.bfloat16)  # as FSDP's MixedPrecisionPolicy gathers them
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x, y = (torch.randint(0, config.vocab_size, (batch, seq)) for _ in range(2))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision != "float32" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model(x, y)
    return sum(seen.values())


@pytest.mark.parametrize("precision", budget.PRECISIONS)
@pytest.mark.parametrize("shape", [dict(d_model=64, n_heads=4, n_kv_heads=4, ffn_dim=160),
                                   dict(d_model=96, n_heads=6, n_kv_heads=2, ffn_dim=256),  # GQA
                                   dict(d_model=64, n_heads=4, n_kv_heads=4, ffn_dim=160, head_dim=32)])
def test_activation_formula_matches_what_torch_saves(shape, precision):
    batch, seq = 3, 24
    one, two = (ModelConfig(**shape, n_layers=n, max_seq_len=seq, vocab_size=320) for n in (1, 2))
    block = saved_bytes(two, precision, batch, seq) - saved_bytes(one, precision, batch, seq)  # one more block
    hd = one.head_dim
    matmul = budget.llama_non_embedding_params(one.d_model, 1, one.n_heads, one.n_kv_heads, one.ffn_dim, hd) - 3 * one.d_model
    assert block == budget.block_activation_bytes(one.d_model, one.n_heads, one.n_kv_heads, hd, one.ffn_dim, precision) \
        * batch * seq + budget.block_fixed_bytes(matmul, seq, hd, precision)
    # outside the blocks: the head's formula, up to the loss (a scalar) and, in float32, RoPE's two (seq, hd/2)
    # tables cast once per forward
    head = saved_bytes(one, precision, batch, seq) - block
    predicted = budget.head_activation_bytes(one.d_model, 320, precision) * batch * seq \
        + (2 * 320 * one.d_model if precision == "amp" else 0)
    assert 0 <= head - predicted <= 4 + (seq * hd * 4 if precision == "float32" else 0)


def test_activation_checkpointing_saves_no_block_activations_and_gives_the_same_gradients():
    config = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=160, max_seq_len=32)
    idx = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Llama(config)
        if checkpointed:
            parallel.checkpoint_blocks(model)
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])  # the recomputation is the same arithmetic
    # a checkpointed block keeps its input alone (the residual stream, d values per token; budget.py's
    # memory_per_gpu counts that), where without checkpointing each block adds all of its activations
    deep, shallow = replace(config, n_layers=4), replace(config, n_layers=1)
    kept = saved_bytes(deep, "float32", checkpointed=True) - saved_bytes(shallow, "float32", checkpointed=True)
    assert kept == 3 * 4 * config.d_model * 2 * 32
    full = saved_bytes(deep, "float32") - saved_bytes(shallow, "float32")
    assert full == 3 * budget.block_activation_bytes(64, 4, 4, 16, 160, "float32") * 2 * 32


def test_memory_plan():
    shape = budget.PAPER_SHAPES["paper-8B"]
    with torch.device("meta"):
        P = Llama(ModelConfig(**shape, vocab_size=50304)).num_params(non_embedding=False)  # model.py's own count
    ddp = budget.memory_per_gpu(shape, 50304, False, 8, 1024, 1, 8, "ddp", False)
    assert ddp.weights + ddp.grads + ddp.optimizer == 16 * P  # float32 weights and gradients, two float32 moments
    fsdp = budget.memory_per_gpu(shape, 50304, False, 8, 1024, 1, 8, "fsdp", True)
    assert fsdp.optimizer == 8 * P / 8
    accum = budget.memory_per_gpu(shape, 50304, False, 8, 1024, 8, 8, "fsdp", True)
    assert accum.grads == fsdp.grads  # reduce-scattered after every micro-step: accumulation keeps them sharded
    assert budget.memory_per_gpu(shape, 50304, False, 8, 1024, 1, 8, "fsdp", False).activations > 4 * fsdp.activations
    assert budget.gpu_memory("NVIDIA H100 80GB HBM3") == budget.gpu_memory("H100") == 80 * 2**30
    # MFU's peak by device name: the H200 NVL (a 600 W PCIe card) its own bf16 dense 835 TFLOP/s, not the SXM's 989
    assert budget.peak_flops("NVIDIA H200 NVL") == 835e12 and budget.peak_flops("NVIDIA H200") == 989e12
    assert budget.gpu_memory("NVIDIA A100-SXM4-40GB") == 40 * 2**30 and budget.gpu_memory("H200") == 141 * 2**30
    out = subprocess.run([sys.executable, "budget.py", "--memory", "--sizes", "paper-1B,paper-8B", "--gpus", "8", "--gpu", "H100"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    table = {tuple(line.split()[:4]): line.split()[-1] for line in out.stdout.splitlines() if line.startswith("paper-")}
    assert table[("paper-8B", "8.44B", "ddp", "off")] == "no" and table[("paper-8B", "8.44B", "fsdp", "on")] == "yes"
    assert table[("paper-1B", "1.301B", "ddp", "off")] == "yes"
    out = subprocess.run([sys.executable, "budget.py", "--memory", "configs/series_paper.py"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "fits every member" in out.stdout, out.stdout + out.stderr
    out = subprocess.run([sys.executable, "budget.py", "--memory", "--sizes", "1B"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1


# -----------------------------------------------------------------------------
# the MFU peak and bench_gpu.py


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(common, "measure_matmul_peak", lambda device: calls.append(device) or 2.5e11)
    assert common.cpu_matmul_peak() == (2.5e11, str(tmp_path / "nanogrow" / "cpu_peak.json"))
    assert common.cpu_matmul_peak()[0] == 2.5e11 and len(calls) == 1  # the second run reads the file
    cache = json.loads((tmp_path / "nanogrow" / "cpu_peak.json").read_text())
    (key, entry), = cache.items()
    assert f"torch {torch.__version__}" in key and f"{torch.get_num_threads()} threads" in key and entry["flops"] == 2.5e11
    (tmp_path / "nanogrow" / "cpu_peak.json").write_text("{not json")  # a corrupt cache is measured again, not trusted
    assert common.cpu_matmul_peak()[0] == 2.5e11 and len(calls) == 2
    threads = torch.get_num_threads()
    try:  # another thread count is another machine as far as the peak goes
        torch.set_num_threads(threads + 1)
        common.cpu_matmul_peak()
        assert len(calls) == 3 and len(json.loads((tmp_path / "nanogrow" / "cpu_peak.json").read_text())) == 2
    finally:
        torch.set_num_threads(threads)


def test_bench_gpu_refuses_without_cuda_and_runs_on_the_cpu(capsys):
    import bench_gpu
    with pytest.raises(SystemExit) as stop:
        bench_gpu.main([])  # this machine has no CUDA
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: no CUDA device") and err.count("\n") == 1
    out = subprocess.run(torchrun_cmd("bench/bench_gpu.py", "--device", "cpu", "--steps", "2", "--warmup", "1", "--compile", "false",
                                      "--batch_size", "2", "--seq_len", "64"), cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| tiny ")]
    assert [[c.strip() for c in row[:5]] for row in table] == [["tiny", "2", p, "off", ac] for p in ("ddp", "fsdp") for ac in ("off", "on")]
    for row in table:
        assert float(row[6].replace(",", "")) > 0 and row[8].strip().endswith("%") and row[9].strip().endswith("GiB")


def test_ranks_that_read_different_files_stop_together_with_one_line(tmp_path):
    # a multi-node launch whose nodes do not share out_dir: rank 1 finds no checkpoint where rank 0 resumes at step 8
    # (what each rank "reads" is simulated here). Every rank stops with the same one line, none trains apart.
    script = tmp_path / "ranks.py"
    script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\n"
                      "from common import cli_errors\nfrom parallel import same_on_every_rank, setup_distributed\n"
                      "with cli_errors():\n"
                      "    rank, _, world, _ = setup_distributed('cpu')\n"
                      "    same_on_every_rank(('out/ckpt_000008.pt', 8), 'agreeing', world)\n"
                      "    same_on_every_rank(('out/ckpt_000008.pt', 8) if rank == 0 else (None, None), '--resume', world)\n"
                      "    print('trained apart')\n")
    out = subprocess.run(torchrun_cmd(str(script)), capture_output=True, text=True, env=ENV)
    assert out.returncode != 0 and "trained apart" not in out.stdout
    # one line from each rank (two processes writing to one stderr may interleave the line ends)
    error = ("error: --resume: rank 1 reads (None, None) where rank 0 reads ('out/ckpt_000008.pt', 8); every node must see "
             "the same out_dir and data_dir: put them on a filesystem all nodes share")
    assert out.stderr.count(error) == 2 and out.stderr.count("error:") == 2, out.stderr[-2000:]


def test_rank0_work_longer_than_the_collective_timeout_is_waited_for(tmp_path):
    # rank 0 alone prepares data, grows a stage, saves a checkpoint (minutes to hours at 8B): the other ranks wait for it
    # in parallel.on_rank0_then_share's gloo group (timeout RANK0_WORK_TIMEOUT), not in a collective of the default group
    # under --dist_timeout, here 5 seconds (the processes' start must fit in it) against 8 seconds of work
    script = tmp_path / "rank0.py"
    script.write_text(f"import sys, time\nsys.path.insert(0, {ROOT!r})\n"
                      "import torch, torch.distributed as dist\n"
                      "from parallel import on_rank0_then_share, setup_distributed\n"
                      "rank, _, world, _ = setup_distributed('cpu', timeout_s=5)\n"
                      "print(on_rank0_then_share(lambda: time.sleep(8) or 'done', rank, world), flush=True)\n"
                      "dist.all_reduce(torch.ones(1))\n"
                      "dist.destroy_process_group()\n")
    out = subprocess.run(torchrun_cmd(str(script)), capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(out.stdout.split()) == ["None", "done"]
