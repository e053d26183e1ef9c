"""The `icmoe::ppav` custom op: CPU implementation, fake implementation (compile/export), model hook; CUDA on GPU hosts."""

from __future__ import annotations

import pytest
import torch

from icmoe.families.icmoe.voting import op as voting_op
from icmoe.families.icmoe.voting import ppav as reference_ppav

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")


def _logits(b=4, h=16, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, 1, h, w, generator=g) + torch.randn(b, 1, 1, 1, generator=g) for _ in range(3))


@pytest.mark.parametrize("balance, threshold", [(False, None), (True, None), (True, 0)])
def test_op_on_cpu_equals_reference(balance, threshold):
    z = _logits(b=9)
    logits, mask, expert = torch.ops.icmoe.ppav(*z, 0.75, balance, threshold)
    ref = reference_ppav(*z, alpha=0.75, balance=balance, threshold=threshold)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=0)
    assert torch.equal(mask, ref.mask) and mask.dtype == torch.uint8
    assert torch.equal(expert, ref.expert) and expert.dtype == torch.int32


def test_opcheck():
    z = _logits(b=3)
    torch.library.opcheck(torch.ops.icmoe.ppav.default, (*z, 0.5, False, None))
    torch.library.opcheck(torch.ops.icmoe.ppav.default, (*z, 0.5, True, 1))


def test_fake_impl_traces_under_compile_and_export():
    class Vote(torch.nn.Module):
        def forward(self, z0, z1, z2):
            return torch.ops.icmoe.ppav(z0, z1, z2, 0.5, False, None)

    z = _logits(b=2)
    compiled = torch.compile(Vote(), backend="aot_eager", fullgraph=True, dynamic=True)
    for got, want in zip(compiled(*z), Vote()(*z)):
        assert torch.equal(got, want)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(Vote(), z, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    assert any("icmoe.ppav" in str(n.target) for n in ep.graph.nodes)
    out = ep.module()(*_logits(b=5))
    assert out[0].shape == (5, 1, 16, 24) and out[1].dtype == torch.uint8 and out[2].shape == (5,)


def test_fake_impl_refuses_mismatched_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, b = torch.empty(2, 1, 8, 8), torch.empty(2, 1, 8, 9)
        with pytest.raises(Exception, match="share one shape"):
            torch.ops.icmoe.ppav(a, a, b, 0.5, False, None)


def test_wrapper_falls_back_to_reference_for_training():
    z = [t.requires_grad_() for t in _logits()]
    target = (torch.rand(4, 1, 16, 24, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    got = voting_op.ppav(*z, target=target, balance=True)
    ref = reference_ppav(*z, target=target, balance=True)
    assert torch.equal(got.expert, ref.expert)
    got.logits.sum().backward()  # gradients flow: the reference, not the op, was used
    assert all(t.grad is not None for t in z)


def test_install_on_model_keeps_cpu_results():
    from icmoe.families.icmoe.model import build_icmoe

    torch.manual_seed(0)
    model = build_icmoe("tiny")
    images = torch.rand(2, 3, 128, 128) * 255
    with torch.inference_mode():
        ref = model(images)
        assert model.voter is reference_ppav  # the default hook is the reference
        voting_op.install(model)
        got = model(images)
    assert model.voter is voting_op.ppav
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="voter"):
        voting_op.install(torch.nn.Linear(2, 2))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("balance", [False, True])
def test_op_on_cuda_runs_the_kernel_and_equals_reference(balance):
    z = _logits(b=7, h=64, w=64)
    ref = reference_ppav(*z, balance=balance)  # on the CPU: IEEE division as in the kernel
    logits, mask, expert = torch.ops.icmoe.ppav(*(t.cuda() for t in z), 0.5, balance, None)
    assert logits.is_cuda and mask.dtype == torch.uint8 and expert.dtype == torch.int32
    assert torch.equal(expert.cpu(), ref.expert) and torch.equal(mask.cpu(), ref.mask)
    torch.testing.assert_close(logits.cpu(), ref.logits, rtol=0, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_eager_model_on_cuda_with_the_op():
    from icmoe.families.icmoe.model import build_icmoe

    torch.manual_seed(0)
    model = build_icmoe("tiny")
    images = torch.rand(4, 3, 128, 128) * 255
    with torch.inference_mode():
        ref = model(images)
        got = voting_op.install(model.cuda())(images.cuda())
    # experts on CUDA differ from the CPU by float rounding: compare like engines do
    dice = (2 * (got.mask.cpu() & ref.mask).sum() + 1) / (got.mask.cpu().sum() + ref.mask.sum() + 1)
    assert float(dice) >= 0.995
    assert (got.expert.cpu() == ref.expert).float().mean() >= 0.75
