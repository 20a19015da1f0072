"""torch.compile sees one graph per training step: no graph break in the model's forward and backward, so
inductor can fuse the whole step (the CPU shows what dynamo does on every device). Captured with
fullgraph=True on the "eager" backend: dynamo's tracing without inductor's code generation, in seconds."""

import os
import sys

import pytest
import torch
import torch._dynamo.testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ops  # noqa: E402
from model import Llama, config_from_shape  # noqa: E402

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
