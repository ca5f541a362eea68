"""Distillation losses on the positions that predict answer tokens.

Every function takes rows that are already gathered: one row per position that predicts an answer token
(`[N, vocab]` logits, `[N, k]` top-k entries, `[N, hidden]` states), so the callers never spend the vocabulary
projection or the divergence on prompt or padding positions. Each returns the mean over its rows, so the terms
can be mixed with weights; an empty selection gives a zero that still belongs to the graph.

Divergences follow the generalized JSD of Agarwal et al. (2024, "On-Policy Distillation of Language Models",
the GKD paper), as in TRL's GKD trainer: with teacher distribution p, student q and mixture m = beta p + (1 - beta) q,
JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m). Forward KL(p || q) makes the student cover every answer the
teacher finds likely; reverse KL(q || p) lets it settle on the teacher's main mode. Logit losses are multiplied
by temperature squared, so their gradients keep their size as the temperature changes (Hinton et al., 2015).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
HiddenLoss = Literal["cosine", "mse"]


def _zero(reference: torch.Tensor) -> torch.Tensor:
    # Keeps the graph connected (DDP expects every step to touch the same parameters) while adding nothing.
    return reference.sum() * 0.0


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SFT: mean negative log-likelihood of the answer tokens. `student_logits` [N, V], `targets` [N]."""
    if targets.numel() == 0:
        return _zero(student_logits)
    return F.cross_entropy(student_logits.float(), targets)


def logit_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: Divergence = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Mean divergence between teacher and student next-token distributions over the full vocabulary.

    `student_logits` and `teacher_logits` are `[N, V]`; `beta` is the teacher's share of the JSD mixture (jsd only).
    """
    if student_logits.shape[0] == 0:
        return _zero(student_logits)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        per_row = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    elif kind == "reverse_kl":
        per_row = F.kl_div(teacher, student, log_target=True, reduction="none").sum(-1)
    elif kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError("jsd needs 0 < beta < 1 (beta 0 is forward KL, 1 is reverse KL up to scale)")
        # log m = logsumexp(log p + log beta, log q + log(1 - beta)), stable where either probability is tiny.
        mixture = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log1p(-beta)]), dim=0)
        kl_teacher = F.kl_div(mixture, teacher, log_target=True, reduction="none").sum(-1)
        kl_student = F.kl_div(mixture, student, log_target=True, reduction="none").sum(-1)
        per_row = beta * kl_teacher + (1 - beta) * kl_student
    else:
        raise ValueError(f"unknown divergence {kind!r}; use forward_kl, reverse_kl or jsd")
    return per_row.mean() * temperature**2


def topk_divergence(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Forward KL from a teacher known only by its top-k log-probabilities (what hosted endpoints return).

    The teacher's k candidates are renormalised among themselves at the temperature (p^(1/T) over the k), and the
    student is scored by its full-vocabulary log-probability of each: sum_k p_k (log p_k - log q_k). The value is
    zero exactly when the student puts all its mass on the k candidates in the teacher's proportions.

    `student_logits` [N, V]; `topk_ids` [N, k] long; `topk_logprobs` [N, k], with -inf for unused slots (a row
    may carry fewer than k candidates).
    """
    if student_logits.shape[0] == 0:
        return _zero(student_logits)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, topk_ids)
    teacher = F.log_softmax(topk_logprobs.float() / temperature, dim=-1)
    used = torch.isfinite(topk_logprobs)
    terms = torch.where(used, teacher.exp() * (teacher - student), torch.zeros_like(student))
    return terms.sum(-1).mean() * temperature**2


def hidden_state_distance(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor], kind: HiddenLoss = "cosine") -> torch.Tensor:
    """Mean distance between paired student and teacher hidden states, averaged over layers and positions.

    Each list holds one `[N, hidden]` tensor per matched layer. cosine: 1 - cosine similarity per position,
    blind to the scale of the residual stream (which grows with depth); mse: mean squared difference per element.
    """
    if not student_states:
        raise ValueError("no layers to match")
    distances = []
    for student, teacher in zip(student_states, teacher_states, strict=True):
        if student.shape[0] == 0:
            distances.append(_zero(student))
        elif kind == "cosine":
            distances.append((1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean())
        elif kind == "mse":
            distances.append(F.mse_loss(student.float(), teacher.float()))
        else:
            raise ValueError(f"unknown hidden-state loss {kind!r}; use cosine or mse")
    return torch.stack(distances).mean()
