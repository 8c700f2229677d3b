"""The Triton flash attention against a float64 reference: forward and all
three gradients, over N = 1, N not a multiple of the tile, every head dim,
every dtype, and strided inputs. On CPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1): see conftest.py."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
import attention  # noqa: E402  (conftest.py defined its kernels under the interpreter on CPU)
from model import build_model

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def reference(q, k, v, scale):
    """Plain softmax attention in float64."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
    return out, (q, k, v)


def errors(q, k, v, grad_out, scale, fn):
    """Max abs error of output and dq, dk, dv of fn against the float64 reference."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, scale)
    out.backward(grad_out)
    ref_out, ref_inputs = reference(q, k, v, scale)
    ref_out.backward(grad_out.double())
    results = [out] + [x.grad for x in (q, k, v)]
    expected = [ref_out] + [x.grad for x in ref_inputs]
    return [(a.double() - b).abs().max().item() for a, b in zip(results, expected)]


def pytorch_attention(q, k, v, scale):
    """PyTorch in the same dtype: how much error the dtype itself brings."""
    return torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1).to(q.dtype) @ v


def check(q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    grad_out = torch.randn(q.shape, device=q.device, dtype=q.dtype)
    ours = errors(q, k, v, grad_out, scale, attention.triton_attention)
    if q.dtype == torch.float32:
        # fp32 with exact (non-TF32) dot products: close to float64
        assert max(ours) < 1e-4, ours
    else:
        theirs = errors(q, k, v, grad_out, scale, pytorch_attention)
        # the FlashAttention repo's criterion: no worse than 2x (output) or
        # 3x (gradients) the error PyTorch itself makes in this dtype
        for name, a, b, factor in zip(("out", "dq", "dk", "dv"), ours, theirs, (2, 3, 3, 3)):
            assert a <= factor * b + 1e-4, (name, a, b)
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", attention.HEAD_DIMS)
@pytest.mark.parametrize("N", [1, 23, 70])
def test_matches_reference(N, D, dtype):
    torch.manual_seed(N * D)
    q, k, v = (torch.randn(2, 2, N, D, device=DEVICE, dtype=dtype) for _ in range(3))
    check(q, k, v)


def test_strided_inputs_and_custom_scale():
    torch.manual_seed(0)
    # q, k, v as views into one packed tensor (like a fused qkv projection),
    # and a transposed layout (B, N, H, D) -> (B, H, N, D).
    packed = torch.randn(2, 37, 3, 2, 32, device=DEVICE)  # (B, N, 3, H, D)
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    check(q, k, v, scale=0.3)
    wide = torch.randn(1, 2, 19, 64, device=DEVICE)
    check(wide[..., :32], wide[..., 32:], wide[..., 16:48])  # sliced head dims


def test_large_logits_stay_finite():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 40, 16, device=DEVICE) for _ in range(3))
    check(q * 30, k * 30, v)  # softmax near one-hot: the online max must work


def test_dispatch(monkeypatch):
    q = torch.randn(1, 1, 8, 16)
    assert attention.use_triton(q)  # CPU under TRITON_INTERPRET=1
    assert not attention.use_triton(torch.randn(1, 1, 8, 24))  # unsupported head dim
    torch.testing.assert_close(attention.flash_attention(q, q, q),
                               torch.nn.functional.scaled_dot_product_attention(q, q, q))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert attention.use_triton(q) == ON_GPU
    with pytest.raises(ValueError, match="share a"):
        attention.flash_attention(q, q, q[:, :, :4])


def test_model_through_the_kernel_matches_pytorch(monkeypatch):
    torch.manual_seed(0)
    net = build_model("micro")
    for block in net.blocks:  # make attention matter at all (adaLN-Zero starts at identity)
        torch.nn.init.normal_(block.ada_ln[-1].weight, std=0.2)
    torch.nn.init.normal_(net.final_linear.weight, std=0.2)
    x, t = torch.randn(2, 4, 3, 16, 16), torch.rand(2)
    expected = net(x, t, x[:, 0])
    expected.square().mean().backward()
    expected_grad = net.blocks[0].attn.qkv.weight.grad.clone()
    net.zero_grad()
    monkeypatch.setattr("model.flash_attention", attention.triton_attention)
    out = net(x, t, x[:, 0])
    out.square().mean().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(net.blocks[0].attn.qkv.weight.grad, expected_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(ON_GPU, reason="a CPU-only machine's behaviour")
def test_cpu_sampling_does_not_import_triton():
    # Triton could not run there (no GPU, no interpreter): importing it would only slow `python sample.py`.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", "import sys, sample; print('triton' in sys.modules)"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
