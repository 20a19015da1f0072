"""model.py against an independent reference: transformers' LlamaForCausalLM (a test-only
dependency), plus the KV cache, the counts, checkpoint validation (checkpoint.model_from_checkpoint) and hf.py's
safetensors and command line."""

import json
import os
import random
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import budget
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from hf import export_hf, import_hf, read_safetensors, write_safetensors
from model import KVCache, Llama, ModelConfig, config_from_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_config(rng):
    n_kv = rng.choice([1, 2, 3])
    group = rng.choice([1, 2, 3])  # group 1 is plain multi-head attention
    head_dim = rng.choice([8, 16])
    # transformers requires d_model % n_heads == 0; head_dim is still drawn on its own
    d_model = n_kv * group * rng.choice([8, 12, 16])
    return ModelConfig(vocab_size=rng.choice([262, 300, 320]), d_model=d_model, n_layers=rng.choice([1, 2, 3]),
                       n_heads=n_kv * group, n_kv_heads=n_kv, head_dim=head_dim, ffn_dim=rng.choice([40, 96, 130]),
                       max_seq_len=64, rope_theta=rng.choice([10000.0, 500000.0]), norm_eps=rng.choice([1e-5, 1e-6]),
                       tie_embeddings=rng.random() < 0.5)


def perturb_norms(model, gen):
    # RMSNorm gains start at 1; make them random so a wrong gain mapping cannot pass
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("seed", range(6))
def test_logits_match_transformers_llama(seed, tmp_path):
    transformers = pytest.importorskip("transformers")
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    config = random_config(rng)
    torch.manual_seed(seed)
    model = Llama(config).eval()
    perturb_norms(model, gen)
    export_hf(model, tmp_path / "hf", tokenizer={"name": "bytes", "vocab_size": config.vocab_size})
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == config.tie_embeddings
    idx = torch.randint(0, config.vocab_size, (3, 37), generator=gen)
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4, config
    # and back: import-hf gives the same model again
    again, tok = import_hf(tmp_path / "hf")
    assert asdict(again.config) == asdict(config) and tok["name"] == "bytes"
    with torch.no_grad():
        assert torch.equal(again(idx)[0], ours)


def test_loss_is_mean_cross_entropy_in_float64():
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=48, max_seq_len=16)).double()
    idx = torch.randint(0, 50, (2, 16))
    targets = torch.randint(0, 50, (2, 16))
    targets[0, :5] = -1  # ignored positions
    logits, loss = model(idx, targets)
    logp = torch.log_softmax(logits.double(), -1)
    keep = targets != -1
    expected = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    assert abs(loss.item() - expected.item()) < 1e-12


@pytest.mark.parametrize("n_kv_heads", [1, 4])
def test_cached_generation_equals_uncached(n_kv_heads):
    torch.manual_seed(1)
    model = Llama(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=64, max_seq_len=48)).eval()
    prompt = torch.randint(0, 64, (2, 7))
    greedy_cached = model.generate(prompt, 20, temperature=0, use_cache=True)
    greedy_plain = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(greedy_cached, greedy_plain)
    sampled = [model.generate(prompt, 20, temperature=1.0, top_k=10, use_cache=c, generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert torch.equal(*sampled)
    # the cached logits themselves, for a prompt fed in two chunks, equal one full forward
    seq = torch.randint(0, 64, (2, 30))
    cache = KVCache(model.config, 2, 30, "cpu", torch.float32)
    with torch.no_grad():
        a, _ = model(seq[:, :11], kv_cache=cache)
        b, _ = model(seq[:, 11:], kv_cache=cache)
        full, _ = model(seq)
    assert (torch.cat([a, b], 1) - full).abs().max().item() < 1e-5


def test_generate_stops_at_eos():
    torch.manual_seed(2)
    model = Llama(ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32, max_seq_len=64)).eval()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt, 30, temperature=0, eos_id=first)
    assert out.shape[1] == 4


def test_param_counts_closed_form():
    # the paper's Table 3 shapes, counted by hand: per layer 4 d^2 (q, k, v, o with n_kv = n_heads),
    # 3 d ffn (SwiGLU), 2 d (norm gains); plus the final norm
    for name, approx in [("paper-1B", 1.095e9), ("paper-2B", 2.091e9), ("paper-4B", 4.009e9), ("paper-8B", 8.028e9)]:
        c = config_from_shape(name)
        with torch.device("meta"):
            m = Llama(c)
        by_hand = c.n_layers * (4 * c.d_model ** 2 + 3 * c.d_model * c.ffn_dim + 2 * c.d_model) + c.d_model
        assert m.num_params(non_embedding=True) == by_hand
        assert abs(by_hand - approx) / approx < 0.01
        assert m.num_params(non_embedding=False) == by_hand + 2 * c.vocab_size * c.d_model
        assert m.flops_per_token(with_attention=False) == 6 * by_hand
        assert m.flops_per_token(1024) == 6 * (by_hand + c.vocab_size * c.d_model) + 12 * c.n_layers * c.d_model * 1024
    tied = Llama(config_from_shape("pu1"))
    assert tied.num_params(False) == tied.num_params(True) + tied.config.vocab_size * tied.config.d_model


def test_passuntil_family_shape_rule():
    for i in range(1, 9):
        c = config_from_shape(f"pu{i}")
        assert c.n_layers == 4 * i and c.n_heads == (i * (8 + i)) // 4 and c.head_dim == 64 and c.tie_embeddings
        assert 2.5 * c.d_model <= c.ffn_dim < 2.5 * c.d_model + 64


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown shape"):
        config_from_shape("paper-3B")


def make_ckpt(tmp_path, tokenizer="bytes"):
    torch.manual_seed(0)
    model = Llama(ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, max_seq_len=32))
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": asdict(model.config),
                     "tokenizer": {"name": tokenizer, "vocab_size": 320}}, path)
    return model, path


def test_checkpoint_roundtrip_and_errors(tmp_path):
    model, path = make_ckpt(tmp_path)
    restored = model_from_checkpoint(load_checkpoint(path, tokenizer="bytes"))
    for (k, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), k
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # the temporary file is gone
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_checkpoint(path, tokenizer="gpt2")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    partial = tmp_path / "partial.pt"
    torch.save({"model": {}}, partial)
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(partial)
    compiled = tmp_path / "compiled.pt"
    torch.save({"model": {"_orig_mod." + k: v for k, v in model.state_dict().items()},
                "model_config": asdict(model.config), "tokenizer": {"name": "bytes"}}, compiled)
    with pytest.raises(CheckpointError, match="compiled"):
        model_from_checkpoint(load_checkpoint(compiled))


def test_safetensors_roundtrip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.zeros(0)}
    write_safetensors(tensors, tmp_path / "x.safetensors")
    back = read_safetensors(tmp_path / "x.safetensors")
    assert all(torch.equal(tensors[k], back[k]) for k in tensors)
    try:  # when the safetensors package is installed, it must read our file too
        from safetensors.torch import load_file
    except ImportError:
        return
    theirs = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(tensors[k], theirs[k]) for k in tensors)


def test_cli_shapes_and_hf_roundtrip(tmp_path):
    out = subprocess.run([sys.executable, "budget.py", "--shapes"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "paper-8B" in out and "8,0" in out  # 8.03B non-embedding
    # the table's closed forms are the Llama's own counts, shape by shape
    for name in budget.SHAPES:
        with torch.device("meta"):
            m = Llama(config_from_shape(name))
        assert f" {m.num_params(True):>14,} {m.num_params(False):>14,}" in out.split(f"\n{name} ", 1)[1].split("\n")[0], name
    _, path = make_ckpt(tmp_path)
    subprocess.run([sys.executable, "hf.py", "export-hf", str(path), str(tmp_path / "hf")], cwd=ROOT, check=True, capture_output=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    subprocess.run([sys.executable, "hf.py", "import-hf", str(tmp_path / "hf"), str(tmp_path / "back.pt")], cwd=ROOT, check=True, capture_output=True)
    a = load_checkpoint(path)["model"]
    b = load_checkpoint(tmp_path / "back.pt", tokenizer="bytes")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    bad = subprocess.run([sys.executable, "hf.py", "export-hf", str(tmp_path / "missing.pt"), str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "no checkpoint" in bad.stderr
