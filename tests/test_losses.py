"""`pagctl.losses`: cosine alignment, the PAG loss and target-class sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagctl.losses import cosine_alignment, pag_loss, sample_target_classes


def test_cosine_alignment_matches_torch_on_flattened_vectors() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, 2, 5, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 3, 2, 5, 5, generator=gen, dtype=torch.float64)
    cos = cosine_alignment(a, b)
    assert cos.shape == (4, 3)
    torch.testing.assert_close(cos, F.cosine_similarity(a.flatten(2), b.flatten(2), dim=2))
    # Scale invariance: the targets may have any positive scale.
    torch.testing.assert_close(cosine_alignment(a * 1e-6, b * 7.0), cos)


def test_cosine_alignment_zero_vectors_give_zero_and_finite_gradients() -> None:
    a = torch.randn(2, 3, 8, dtype=torch.float64)
    b = torch.randn(2, 3, 8, dtype=torch.float64)
    a[0, 0] = 0.0  # zero model gradient
    b[0, 1] = 0.0  # zero target
    a[1, 2] = 0.0
    b[1, 2] = 0.0  # both zero
    a.requires_grad_(True)
    b.requires_grad_(True)
    cos = cosine_alignment(a, b)
    assert torch.isfinite(cos).all()
    assert cos[0, 0] == 0 and cos[0, 1] == 0 and cos[1, 2] == 0
    torch.autograd.backward((1 - cos).sum())
    assert a.grad is not None and b.grad is not None
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    for i, k in ((0, 0), (0, 1), (1, 2)):
        assert a.grad[i, k].abs().max() == 0 and b.grad[i, k].abs().max() == 0
    assert a.grad[1, 0].abs().max() > 0  # defined pairs still get gradients


def test_cosine_alignment_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_alignment(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"\(N, K, \.\.\.\)"):
        cosine_alignment(torch.zeros(3), torch.zeros(3))


def test_pag_loss_values() -> None:
    g = torch.randn(3, 4, 2, 3, 3)
    assert pag_loss(g, g).item() == pytest.approx(0.0, abs=1e-6)
    assert pag_loss(g, 5.0 * g).item() == pytest.approx(0.0, abs=1e-6)
    assert pag_loss(g, -g).item() == pytest.approx(2.0, abs=1e-6)
    other = torch.randn(3, 4, 2, 3, 3)
    expected = (1 - F.cosine_similarity(g.flatten(2), other.flatten(2), dim=2)).mean()
    torch.testing.assert_close(pag_loss(g, other), expected)
    assert pag_loss(g, other).shape == ()


def test_sample_target_classes_distinct_and_in_range() -> None:
    labels = torch.randint(0, 10, (50,))
    classes = sample_target_classes(labels, 10, 4, torch.Generator().manual_seed(0))
    assert classes.shape == (50, 4) and classes.dtype == torch.int64
    assert classes.device == labels.device
    assert int(classes.min()) >= 0 and int(classes.max()) < 10
    assert all(len(set(row.tolist())) == 4 for row in classes)


def test_sample_target_classes_all_classes_is_a_permutation() -> None:
    labels = torch.randint(0, 7, (20,))
    classes = sample_target_classes(labels, 7, 7, torch.Generator().manual_seed(1))
    assert torch.equal(classes.sort(dim=1).values, torch.arange(7).expand(20, 7))
    assert all(int(y) in row.tolist() for y, row in zip(labels, classes, strict=True))
    # The order is random, not sorted or label-first.
    assert not torch.equal(classes, classes.sort(dim=1).values)


def test_sample_target_classes_is_deterministic_and_leaves_global_rng() -> None:
    labels = torch.zeros(30, dtype=torch.int64)
    state = torch.get_rng_state()
    first = sample_target_classes(labels, 10, 3, torch.Generator().manual_seed(42))
    second = sample_target_classes(labels, 10, 3, torch.Generator().manual_seed(42))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second)
    gen = torch.Generator().manual_seed(42)
    sample_target_classes(labels, 10, 3, gen)
    assert not torch.equal(sample_target_classes(labels, 10, 3, gen), first)  # it advances


def test_sample_target_classes_is_uniform() -> None:
    """Each class appears in about K/C of the rows; the true class has no special role."""
    n, c, k = 4000, 5, 2
    labels = torch.zeros(n, dtype=torch.int64)
    classes = sample_target_classes(labels, c, k, torch.Generator().manual_seed(3))
    freq = torch.bincount(classes.flatten(), minlength=c).double() / n
    # Binomial standard deviation sqrt(0.4 * 0.6 / 4000) ≈ 0.008; allow 5 sigma.
    assert torch.allclose(freq, torch.full((c,), k / c, dtype=torch.float64), atol=0.04)


def test_sample_target_classes_rejects_bad_arguments() -> None:
    labels = torch.zeros(4, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="k must be"):
        sample_target_classes(labels, 10, 11, gen)
    with pytest.raises(ValueError, match="k must be"):
        sample_target_classes(labels, 10, 0, gen)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        sample_target_classes(labels.view(2, 2), 10, 2, gen)
