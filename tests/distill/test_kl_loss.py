"""The blocked KD loss equals the plain composition it replaces, in value and in gradient."""

import pytest
import torch
import torch.nn.functional as F

from come.distill import common
from come.distill.common import _kl


def reference_kl(student_logits, teacher_logits, temperature):
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("block", [1 << 21, 3 * 97])  # one block; blocks of 3 rows over 2 x 7 rows (a short last one)
def test_blocked_kl_matches_the_plain_loss_and_its_gradient(monkeypatch, dtype, temperature, block):
    monkeypatch.setattr(common, "_KL_BLOCK", block)
    torch.manual_seed(0)
    student = (3 * torch.randn(2, 7, 97)).to(dtype).requires_grad_(True)
    teacher = (3 * torch.randn(2, 7, 97)).to(dtype)
    mine = _kl(student, teacher, temperature)
    (grad_mine,) = torch.autograd.grad(2.0 * mine, student)  # a non-unit upstream gradient is passed through
    plain = reference_kl(student, teacher, temperature)
    (grad_plain,) = torch.autograd.grad(2.0 * plain, student)
    assert mine.dtype == torch.float32 and mine.shape == ()
    assert mine.item() == pytest.approx(plain.item(), rel=1e-5)
    assert grad_mine.dtype == dtype and grad_mine.shape == student.shape
    torch.testing.assert_close(grad_mine, grad_plain)  # the dtype's default tolerances


def test_blocked_kl_is_zero_against_itself_and_positive_under_no_grad():
    logits = torch.randn(3, 5, 11)
    assert _kl(logits, logits, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        assert _kl(logits, torch.randn(3, 5, 11), 1.0).item() > 0


def test_blocked_kl_is_the_same_under_bfloat16_autocast():
    """Stage 2 runs the loss inside autocast: the blocks are still computed in float32."""
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 50).requires_grad_(True), torch.randn(4, 50)
    plain = _kl(student, teacher, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = _kl(student, teacher, 1.0)
    assert inside.item() == pytest.approx(plain.item(), rel=1e-6)


def test_blocked_kl_gradient_reaches_non_contiguous_logits(monkeypatch):
    monkeypatch.setattr(common, "_KL_BLOCK", 2 * 31)
    torch.manual_seed(2)
    base = torch.randn(5, 3, 31, requires_grad=True)
    student, teacher = base.transpose(0, 1), torch.randn(3, 5, 31)  # (3, 5, 31), not contiguous
    (grad_mine,) = torch.autograd.grad(_kl(student, teacher, 1.0), base)
    (grad_plain,) = torch.autograd.grad(reference_kl(student, teacher, 1.0), base)
    torch.testing.assert_close(grad_mine, grad_plain)
