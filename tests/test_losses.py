"""Distillation losses against references computed by hand, one position and one probability at a time."""

from __future__ import annotations

import math

import pytest
import torch

from azdistill.training.losses import cross_entropy, hidden_state_distance, logit_divergence, topk_divergence


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(value / temperature) for value in values]
    return [value / sum(exps) for value in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)


def test_cross_entropy_is_the_mean_negative_log_likelihood(logits):
    student, _ = logits
    targets = torch.tensor([4, 0, 2])
    expected = -sum(math.log(softmax(student[row].tolist())[target]) for row, target in enumerate(targets.tolist())) / 3
    assert float(cross_entropy(student, targets)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_match_a_hand_computation(logits, temperature):
    student, teacher = logits
    forward = reverse = 0.0
    for row in range(3):
        p, q = softmax(teacher[row].tolist(), temperature), softmax(student[row].tolist(), temperature)
        forward += kl(p, q)
        reverse += kl(q, p)
    scale = temperature**2 / 3
    assert float(logit_divergence(student, teacher, "forward_kl", temperature)) == pytest.approx(forward * scale, rel=1e-6)
    assert float(logit_divergence(student, teacher, "reverse_kl", temperature)) == pytest.approx(reverse * scale, rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_a_hand_computation(logits, beta):
    student, teacher = logits
    temperature = 1.5
    expected = 0.0
    for row in range(3):
        p, q = softmax(teacher[row].tolist(), temperature), softmax(student[row].tolist(), temperature)
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        expected += beta * kl(p, m) + (1 - beta) * kl(q, m)
    expected *= temperature**2 / 3
    assert float(logit_divergence(student, teacher, "jsd", temperature, beta)) == pytest.approx(expected, rel=1e-6)


def test_divergences_vanish_for_identical_distributions_and_jsd_is_bounded(logits):
    student, teacher = logits
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert float(logit_divergence(teacher, teacher, kind)) == pytest.approx(0.0, abs=1e-6)  # float32 inside
    # At beta 0.5 the JSD is symmetric and at most log 2 (distributions with no overlap).
    assert float(logit_divergence(student, teacher, "jsd")) == pytest.approx(float(logit_divergence(teacher, student, "jsd")), rel=1e-9)
    apart = torch.tensor([[50.0, -50.0]], dtype=torch.float64)
    assert float(logit_divergence(apart, -apart, "jsd")) == pytest.approx(math.log(2), rel=1e-6)


def test_topk_divergence_matches_a_hand_computation():
    student = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.0, -2.0]], dtype=torch.float64)
    ids = torch.tensor([[3, 0, 1], [1, 2, 0]])
    # Row 2 has only two candidates; its third slot is unused (-inf).
    logprobs = torch.tensor([[-0.2, -1.9, -3.0], [-0.1, -2.5, float("-inf")]], dtype=torch.float64)
    temperature = 2.0
    expected = 0.0
    for row in range(2):
        used = [(i, lp) for i, lp in zip(ids[row].tolist(), logprobs[row].tolist()) if lp != float("-inf")]
        p = softmax([lp for _, lp in used], temperature)  # p^(1/T) renormalised over the candidates
        q_all = softmax(student[row].tolist(), temperature)
        expected += sum(pi * (math.log(pi) - math.log(q_all[i])) for pi, (i, _) in zip(p, used))
    expected *= temperature**2 / 2
    assert float(topk_divergence(student, ids, logprobs, temperature)) == pytest.approx(expected, rel=1e-6)


def test_topk_divergence_is_zero_only_when_the_student_matches_the_teacher_on_its_candidates():
    ids = torch.tensor([[0, 1]])
    logprobs = torch.log(torch.tensor([[0.75, 0.25]], dtype=torch.float64))
    matching = torch.log(torch.tensor([[0.75, 0.25, 1e-30]], dtype=torch.float64))
    assert float(topk_divergence(matching, ids, logprobs)) == pytest.approx(0.0, abs=1e-6)
    leaking = torch.log(torch.tensor([[0.6, 0.2, 0.2]], dtype=torch.float64))  # right proportions, mass elsewhere
    assert float(topk_divergence(leaking, ids, logprobs)) == pytest.approx(-math.log(0.8), rel=1e-6)


def test_hidden_state_distances_match_a_hand_computation():
    student = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 4.0], [1.0, 1.0]])]
    teacher = [torch.tensor([[1.0, 1.0], [0.0, 5.0]]), torch.tensor([[3.0, 4.0], [-1.0, -1.0]])]
    cosines = [
        [1 / math.sqrt(2), 1.0],  # layer 1: 45 degrees, then same direction at another scale
        [1.0, -1.0],  # layer 2: same vector, then opposite
    ]
    expected_cosine = sum(sum(1 - c for c in layer) / 2 for layer in cosines) / 2
    assert float(hidden_state_distance(student, teacher, "cosine")) == pytest.approx(expected_cosine, rel=1e-6)
    squared = [((0 + 1 + 0 + 9) / 4), ((0 + 0 + 4 + 4) / 4)]
    assert float(hidden_state_distance(student, teacher, "mse")) == pytest.approx(sum(squared) / 2, rel=1e-6)


def test_empty_selections_give_a_zero_that_keeps_the_graph():
    student = torch.zeros(0, 5, requires_grad=True)
    loss = logit_divergence(student, torch.zeros(0, 5)) + cross_entropy(student, torch.zeros(0, dtype=torch.long))
    loss = loss + topk_divergence(student, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert student.grad is not None
