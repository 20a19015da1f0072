# budget.py against the paper's own numbers (Yano et al. 2025, sections 2.2, 3.3, 3.4). No torch, no network.
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import budget  # noqa: E402

Z = 1e21
SIZES = [10**9, 2 * 10**9, 4 * 10**9, 8 * 10**9]


def test_flops_and_chinchilla():
    assert budget.flops(10**9, 40 * 10**9) == 2.4e20
    assert budget.chinchilla_tokens(10**9) == 20 * 10**9
    assert budget.chinchilla_tokens(8 * 10**9, multiplier=2) == 320 * 10**9
    # nanoGPT: 6N + 12*L*d*T
    assert budget.flops_per_token(100, 2, 8, 16) == 600 + 12 * 2 * 8 * 16


def test_paper_series_2x_chinchilla():
    stages = budget.staged_budget(SIZES, tokens_per_param=40)
    assert [s.name for s in stages] == ["1B", "2B", "4B", "8B"]
    assert [s.scratch_flops / Z for s in stages] == pytest.approx([0.24, 0.96, 3.84, 15.36])
    assert [s.staged_tokens for s in stages] == [40e9, 60e9, 120e9, 240e9]
    # the cumulative spend after stage i is exactly the scratch cost of size i (section 2.2)
    assert [s.cumulative_flops for s in stages] == [s.scratch_flops for s in stages]
    sm = budget.summarize(stages)
    assert sm.scratch_flops / Z == pytest.approx(20.4)
    assert sm.staged_flops / Z == pytest.approx(15.36)
    assert sm.staged_flops == sm.largest_flops
    assert sm.saving == pytest.approx(1 - 15.36 / 20.4)
    assert round(sm.saving, 3) == 0.247
    assert sm.staged_tokens == 460e9 and sm.largest_tokens == 320e9


def test_sizes_as_strings_and_names():
    a = budget.staged_budget(["1B", "2B", "4B", "8B"], 40)
    b = budget.staged_budget(SIZES, 40, names=["a", "b", "c", "d"])
    assert [s.staged_tokens for s in a] == [s.staged_tokens for s in b]
    assert [s.name for s in b] == ["a", "b", "c", "d"]


def test_fixed_data_paper():
    stages = budget.staged_budget(SIZES, 40)
    cap, uses = budget.fixed_data(stages)
    assert cap == 320e9
    # 1B -> 2B -> 4B go as normal (40 + 60 + 120 = 220B unique), only the 8B stage repeats
    assert [(u.unique, u.repeated) for u in uses] == [(40e9, 0), (60e9, 0), (120e9, 0), (100e9, 140e9)]
    assert sum(u.unique for u in uses) == cap


def test_fixed_data_small_cap():
    stages = budget.staged_budget(SIZES, 40)
    _, uses = budget.fixed_data(stages, cap="50B")
    assert [(u.unique, u.repeated) for u in uses] == [(40e9, 0), (10e9, 50e9), (0, 120e9), (0, 240e9)]


def test_parse_size():
    assert budget.parse_size("1B") == 10**9
    assert budget.parse_size("125M") == 125 * 10**6
    assert budget.parse_size("350K") == 350_000
    assert budget.parse_size("1.5B") == 1_500_000_000
    assert budget.parse_size("2e9") == 2 * 10**9
    assert budget.parse_size(7) == 7
    for bad in ["", "B", "1X", "one"]:
        with pytest.raises(ValueError, match="cannot parse size"):
            budget.parse_size(bad)


def test_paper_1b_shape_params():
    # written out by hand: 18 layers of q,k,v,o (4 d^2) + SwiGLU (3 d ffn) + 2 norms (2 d), + final norm
    d, ffn, L = 2048, 7168, 18
    hand = L * (4 * d * d + 3 * d * ffn + 2 * d) + d
    assert hand == 1_094_789_120
    assert budget.llama_non_embedding_params(2048, 18, 16, 16, 7168) == hand
    assert budget.stage_params(dict(name="1B", shape="paper-1B")) == hand
    assert budget.stage_params(dict(d_model=2048, n_layers=18, n_heads=16, n_kv_heads=16, ffn_dim=7168)) == hand
    # Table 3 shapes land near their nominal sizes and grow monotonically
    xs = [budget.stage_params(dict(shape=f"paper-{n}")) for n in ["1B", "2B", "4B", "8B"]]
    assert xs == sorted(xs)
    for x, nominal in zip(xs, SIZES):
        assert 0.9 < x / nominal < 1.15


def test_gqa_and_total_count():
    # GQA: k and v shrink to n_kv_heads * head_dim
    d = 64  # head_dim 16
    x = budget.llama_non_embedding_params(d, 1, 4, 1, 128)
    assert x == (d * 64 + 2 * d * 16 + 64 * d) + 3 * d * 128 + 2 * d + d
    s = dict(name="t", d_model=64, n_layers=1, n_heads=4, n_kv_heads=1, ffn_dim=128)
    assert budget.stage_params(s, "total", vocab_size=100) == x + 2 * 100 * 64
    assert budget.stage_params(s, "total", vocab_size=100, tied=True) == x + 100 * 64
    assert budget.stage_params(dict(params="1.5B")) == 1_500_000_000


def test_gpu_time():
    assert budget.peak_flops("H100") == 989e12
    assert budget.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert budget.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert budget.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert budget.peak_flops("989e12") == 989e12
    assert budget.peak_flops(3.12e14) == 3.12e14
    assert budget.peak_flops("some unknown card") is None
    # 1 hour of one GPU at full peak
    assert budget.gpu_hours(989e12 * 3600, 989e12, 1.0) == pytest.approx(1.0)
    assert budget.gpu_hours(989e12 * 3600, 989e12, 0.5) == pytest.approx(2.0)
    assert budget.wall_hours(989e12 * 3600 * 8, 8, 989e12, 1.0) == pytest.approx(1.0)
    assert budget.gpu_days(989e12 * 3600 * 24, 989e12, 1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sizes=["2B", "1B"]), "strictly increasing"),
    (dict(sizes=["1B", "1B"]), "strictly increasing"),
    (dict(sizes=[0, "1B"]), "positive"),
    (dict(sizes=["-1B"]), "cannot parse|positive"),
    (dict(sizes=[]), "empty"),
    (dict(sizes=["1B"], tokens_per_param=0), "tokens_per_param"),
    (dict(sizes=["1B", "2B"], names=["a"]), "names"),
    # a stage whose scratch budget the earlier stages already spent: 6*1e9*100e9 > 6*2e9*20e9
    (dict(sizes=["1B", "2B"], tokens=["100B", "20B"]), "stage 2 '2B' gets no tokens"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        budget.staged_budget(**kwargs)


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "budget.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_cli_sizes():
    r = cli("--sizes", "1B,2B,4B,8B", "--tokens_per_param", "40", "--gpus", "8", "--gpu", "H100",
            "--mfu", "0.4", "--fixed_data")
    assert r.returncode == 0, r.stderr
    assert "X = non-embedding parameters" in r.stdout
    assert "saving: 24.7%" in r.stdout
    assert "20.4 ZFLOPs" in r.stdout and "15.36 ZFLOPs" in r.stdout
    assert "460B staged vs 320B" in r.stdout
    assert "100B unique + 140B repeated" in r.stdout


def test_cli_config(tmp_path):
    cfg = tmp_path / "series.py"
    cfg.write_text('stages = [dict(name="1B", params="1B", lr=1.5e-3), dict(name="2B", params="2B"),\n'
                   '          dict(name="4B", params="4B"), dict(name="8B", params="8B", lr=3e-4)]\n'
                   'tokens_per_param = 40\n')
    r = cli(str(cfg))
    assert r.returncode == 0, r.stderr
    assert "saving: 24.7%" in r.stdout
    shapes = tmp_path / "shapes.py"
    shapes.write_text('stages = [dict(name="1B", shape="paper-1B"), dict(name="8B", shape="paper-8B")]\n'
                      'tokens_per_param = 40\nvocab_size = 50304\n')
    r = cli(str(shapes), "--count", "total")
    assert r.returncode == 0, r.stderr
    assert "X = total parameters" in r.stdout and "saving:" in r.stdout


@pytest.mark.parametrize("args, match", [
    (["--sizes", "1B,2B", "--bogus"], "unrecognized arguments: --bogus"),
    (["--sizes", "2B,1B"], "strictly increasing"),
    (["--sizes", "1B", "--gpu", "nosuchgpu"], "unknown GPU"),
    (["--sizes", "1B", "--count", "total"], "needs model shapes"),
    ([], "nothing to do"),
    (["--memory", "--sizes", "paper-1B", "--gpus", "0"], "--gpus 0: the GPUs the model is spread over must be 1 or more"),
    (["--sizes", "1B", "--mfu", "2"], "--mfu 2.0 --gpus 8: need a utilization in (0, 1]"),
])
def test_cli_errors_one_line(args, match):
    r = cli(*args)
    assert r.returncode == 2
    assert match in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_config_with_model_shape_names(tmp_path):
    # stage shapes other than the paper's are budget.SHAPES names: X from their closed form
    cfg = tmp_path / "series.py"
    cfg.write_text('stages = [dict(name="a", shape="cpu-1", lr=1e-3), dict(name="b", shape="cpu-2", lr=1e-3)]\ntokens_per_param = 5\n')
    out = subprocess.run([sys.executable, "budget.py", str(cfg)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "100.7K" in out.stdout and "215.6K" in out.stdout  # cpu-1: 2*(4*64^2 + 3*64*176 + 2*64) + 64
    assert budget.stage_params({"shape": "cpu-1"}) == 2 * (4 * 64 ** 2 + 3 * 64 * 176 + 2 * 64) + 64
