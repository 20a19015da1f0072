"""ops.py's hand-written backward passes against autograd: torch.autograd.gradcheck in float64 (finite
differences), and against the plain tensor expressions they replace (ops.py's *_plain, written as
transformers writes them), forward and backward, in float64, float32 and bfloat16."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ops import apply_rope, apply_rope_plain, rms_norm, rms_norm_plain, silu_mul, silu_mul_plain  # noqa: E402
from model import Llama, ModelConfig, rope_cos_sin  # noqa: E402


def grads(fn, inputs, g):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    out.backward(g)
    return out.detach(), [t.grad for t in inputs if t.requires_grad]


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, w))
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (0.01 * x.detach().requires_grad_(), w))  # eps matters
    cos, sin = (t[:, None] for t in rope_cos_sin(8, 5, 10000.0))  # (T, 1, D/2), as Llama.forward passes them
    xq = torch.randn(2, 5, 3, 8, dtype=torch.float64, generator=gen, requires_grad=True)  # (B, T, heads, D)
    assert torch.autograd.gradcheck(lambda x: apply_rope(x, cos, sin), (xq,))
    a = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(silu_mul, (a, b))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_equal_to_the_plain_expressions(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    B, T, H, D = 2, 7, 3, 16

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=torch.float64, generator=gen)).to(dtype)

    def close(a, b):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = b.abs().max().item() or 1.0
        assert (a.double() - b.double()).abs().max().item() <= tol * scale, (a - b).abs().max()

    # RMSNorm, including a gain of another dtype (float32 gains on bf16 activations keep transformers' promotion)
    for w_dtype in {dtype, torch.float32}:
        x, w, g = rand(B, T, 4 * D), (1 + 0.5 * torch.randn(4 * D, generator=gen)).to(w_dtype).requires_grad_(), rand(B, T, 4 * D)
        x.requires_grad_()
        ours, ref = grads(lambda x, w: rms_norm(x, w, 1e-6), [x, w], g.to(torch.result_type(x, w))), \
            grads(lambda x, w: rms_norm_plain(x, w, 1e-6), [x, w], g.to(torch.result_type(x, w)))
        close(ours[0], ref[0])
        for a, b in zip(ours[1], ref[1]):
            close(a, b)
    # RoPE on the (B, T, heads, D) layout and on a transposed (B, heads, T, D) view
    cos, sin = rope_cos_sin(D, T, 10000.0)
    x, g = rand(B, T, H, D).requires_grad_(), rand(B, T, H, D)
    for view in (lambda t: t, lambda t: t.transpose(1, 2)):
        c, s = (cos[:, None], sin[:, None]) if view(x).shape[1] == T else (cos, sin)
        ours = grads(lambda t: apply_rope(view(t), c, s), [x], view(g))
        ref = grads(lambda t: apply_rope_plain(view(t), c, s), [x], view(g))
        close(ours[0], ref[0])
        close(ours[1][0], ref[1][0])
    # SwiGLU's gate
    a, b, g = rand(B, T, 3 * D).requires_grad_(), rand(B, T, 3 * D).requires_grad_(), rand(B, T, 3 * D)
    ours, ref = grads(silu_mul, [a, b], g), grads(silu_mul_plain, [a, b], g)
    close(ours[0], ref[0])
    for p, q in zip(ours[1], ref[1]):
        close(p, q)


def test_frozen_inputs_get_no_gradient_and_the_others_are_unchanged():
    # a frozen gain (LoRA, evaluation) or a frozen branch: backward skips it and the rest is the same
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 8, dtype=torch.float64, generator=gen), torch.randn(8, dtype=torch.float64, generator=gen)
    both = grads(lambda x, w: rms_norm(x, w, 1e-5), [x.requires_grad_(), w.requires_grad_()], torch.ones(4, 8, dtype=torch.float64))
    x_only = grads(lambda x, w: rms_norm(x, w, 1e-5), [x.requires_grad_(), w.detach()], torch.ones(4, 8, dtype=torch.float64))
    assert torch.equal(both[1][0], x_only[1][0]) and len(x_only[1]) == 1
    a, b = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    ab = grads(silu_mul, [a.requires_grad_(), b.requires_grad_()], torch.ones(4, 8))
    assert torch.equal(grads(silu_mul, [a, b.detach()], torch.ones(4, 8))[1][0], ab[1][0])
    assert torch.equal(grads(silu_mul, [a.detach(), b], torch.ones(4, 8))[1][0], ab[1][1])


def test_the_model_compiles_with_them():
    # torch.compile traces through the Functions (dynamo) and gives the eager loss and gradients
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48,
                         max_seq_len=16)
    torch.manual_seed(0)
    model = Llama(config)
    idx = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(3))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)
    _, loss_c = compiled(idx[:, :-1], idx[:, 1:])
    loss_c.backward()
    assert abs(loss_c.item() - loss.item()) < 1e-5
    for n, p in model.named_parameters():
        assert (p.grad - eager[n]).abs().max().item() < 1e-5, n


def test_bench_train_in_process_swaps_the_ops_and_puts_them_back():
    # bench_train.py --in_process times nanogrow's model with ops swapped out; afterwards model.py must run ops.py's
    import bench_train
    import model
    import ops
    rows = bench_train.in_process(1, None, warmup=0)
    assert len(rows) == 2 + 6 and all(row.count("|") == 4 for row in rows)
    assert (model.rms_norm, model.apply_rope, model.silu_mul) == (ops.rms_norm, ops.apply_rope, ops.silu_mul)
    with bench_train.swapped(apply_rope=ops.apply_rope_plain):
        assert model.apply_rope is ops.apply_rope_plain
    assert model.apply_rope is ops.apply_rope
    runs = bench_train.models(None)  # the AdamW row: the same groups, the multi-tensor kernel instead of the fused one
    (_, fused), (_, foreach) = runs["nanogrow (ops.py)"][0], runs["nanogrow, foreach AdamW for the fused one"][0]
    assert [(g["fused"], g["foreach"]) for g in fused.param_groups] == [(True, None)] * 2
    assert [(g["fused"], g["foreach"]) for g in foreach.param_groups] == [(None, True)] * 2
    assert [g["weight_decay"] for g in foreach.param_groups] == [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]


def test_bench_train_profile_gives_each_operator_to_its_model():
    # bench_train.py --profile: one step of nanogrow's model; its operators, the Functions' included, in ms per step
    import bench_train
    rows = bench_train.profile(1, None, top=1000, warmup=0)
    by_op = {r.split(" | ")[0][2:]: float(r.split(" | ")[1].rstrip(" |")) for r in rows[2:]}
    assert by_op["aten::mm"] > 0 and by_op["RMSNormFunction"] > 0 and "aten::scaled_dot_product_attention" in by_op
    assert abs(sum(v for k, v in by_op.items() if k != "all operators") - by_op["all operators"]) < 0.01 * by_op["all operators"] + 0.1
