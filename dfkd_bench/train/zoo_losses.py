"""Loss terms of the DFKD zoo (DFAD, ZSKT, DAFL, DeepInversion/ADI, CMI, FastDFKD), as small pure functions.

Each is checked against a value computed by hand in ``tests/test_zoo.py``. The
reduction is part of each definition and stated on each function; where a
paper writes a norm or a sum without saying how a batch is reduced, the choice
is marked CHOSEN and follows the authors' public code.

None of these functions reads a value back to the host, so they can run inside
a training step without synchronising a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dfkd_bench.train.losses import kl_per_sample


def l1_discrepancy(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """DFAD (Fang et al. 2019, Eq. 4): mean absolute error ``|T(x) - S(x)|`` between logits,
    averaged over batch and classes (the paper's ``1/n ||y_T - y_S||_1`` per sample, then the
    batch mean; dividing by the number of classes n as the paper does)."""
    return (teacher_logits.float() - student_logits.float()).abs().mean()


def attention_map(features: Tensor) -> Tensor:
    """ZSKT / Zagoruyko & Komodakis attention: ``f(A) = mean_c A_c^2``, flattened and L2-normalised per sample."""
    spatial = features.float().pow(2).mean(dim=1).flatten(1)
    return F.normalize(spatial, p=2, dim=1)


def attention_transfer(teacher_features: Tensor, student_features: Tensor) -> Tensor:
    """ZSKT (Micaelli & Storkey 2019, Eq. 2) attention term of one block pair:
    ``|| f(A_T)/||f(A_T)|| - f(A_S)/||f(A_S)|| ||^2``.

    CHOSEN reduction (the authors' code): the squared difference is averaged over the batch
    and the spatial positions, not summed; ZSKT's beta = 250 is tuned for this mean.
    """
    return (attention_map(teacher_features) - attention_map(student_features)).pow(2).mean()


def one_hot_loss(teacher_logits: Tensor) -> Tensor:
    """DAFL (Chen et al. 2019, Eq. 2): cross-entropy of the teacher's output to its own argmax, batch mean."""
    logits = teacher_logits.float()
    return F.cross_entropy(logits, logits.argmax(dim=1))


def activation_loss(features: Tensor) -> Tensor:
    """DAFL (Eq. 3): ``-||f_T||_1`` of the teacher's features before the classifier.

    CHOSEN reduction (the authors' code): the mean absolute activation over batch and
    feature dimensions, negated (the paper writes the per-sample L1 norm)."""
    return -features.float().abs().mean()


def information_entropy_loss(teacher_logits: Tensor, base: float = math.e) -> Tensor:
    """DAFL (Eq. 4) ``-H_info(mean_i softmax(T(x_i)))`` = ``sum_j p_j log_base p_j`` with ``p`` the
    batch-mean teacher distribution; minimising it balances the classes.

    The paper does not fix the base. DAFL's official code (DAFL-train.py) uses ``log10``, so DAFL
    passes ``base=10`` (its beta = 5 is tuned for it: natural log is 2.3x stronger); DFQ's class
    balance term in the DataFree re-implementation (``class_balance_loss``) uses the natural log,
    the default here."""
    p = F.softmax(teacher_logits.float(), dim=1).mean(dim=0)
    entropy = torch.special.xlogy(p, p).sum()
    return entropy if base == math.e else entropy / math.log(base)


def kl_mean_over_entries(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """ZSKT's KL as its official code computes it: ``F.kl_div(log_softmax(S), softmax(T))`` with
    PyTorch's default reduction ``'mean'``, which averages over all N x C entries, i.e. the
    batch-mean ``KL(T || S)`` divided by the number of classes C. (The relative weight of ZSKT's
    attention term, beta = 250, is tuned against this KL.)"""
    return kl_per_sample(teacher_logits, student_logits).mean() / teacher_logits.shape[1]


def _neighbour_differences(images: Tensor) -> tuple[Tensor, ...]:
    """The four neighbour differences of DeepInversion's R_TV: horizontal, vertical and the two diagonals."""
    x = images.float()
    return (
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    )


def total_variation(images: Tensor) -> Tensor:
    """DeepInversion (Yin et al. 2020, Eq. 2, R_TV) as in its reference code: the sum of the L2
    norms (over the whole batch) of the four neighbour differences."""
    return sum(d.pow(2).sum().sqrt() for d in _neighbour_differences(images))


def total_variation_l1(images: Tensor) -> Tensor:
    """R_TV as the DataFree re-implementation computes it (zju-vipa/CMI, criterions.get_image_prior_losses,
    ``loss_var_l1``): the sum over the same four neighbour differences of the MEAN absolute difference."""
    return sum(d.abs().mean() for d in _neighbour_differences(images))


def l2_prior(images: Tensor) -> Tensor:
    """DeepInversion (Eq. 2, R_l2): the L2 norm of the whole batch of images."""
    return images.float().pow(2).sum().sqrt()


def feature_distribution_loss(batch_means: Sequence[Tensor], batch_vars: Sequence[Tensor],
                              running_means: Sequence[Tensor], running_vars: Sequence[Tensor]) -> Tensor:
    """DeepInversion (Eq. 3, R_feature), also CMI's and FastDFKD's L_bn:
    ``sum_l ||mu_l(x) - E[mu_l]||_2 + ||sigma^2_l(x) - E[sigma^2_l]||_2`` (unsquared norms), with the
    batch mean and the biased batch variance of each BatchNorm layer's input (the authors' hook)."""
    if not batch_means:
        raise ValueError("feature_distribution_loss needs at least one BatchNorm layer")
    total = batch_means[0].new_zeros((), dtype=torch.float32)
    for mean, var, run_mean, run_var in zip(batch_means, batch_vars, running_means, running_vars, strict=True):
        total = total + (mean.float() - run_mean.float()).norm() + (var.float() - run_var.float()).norm()
    return total


def momentum_statistics(means: Sequence[Tensor], variances: Sequence[Tensor],
                        momentum_means: Sequence[Tensor] | None, momentum_vars: Sequence[Tensor] | None,
                        momentum: float) -> tuple[list[Tensor], list[Tensor]]:
    """FastDFKD's ``bn_mmt`` (the authors' ``DeepInversionHook(module, mmt_rate)``): the batch statistics
    matched against the teacher's running ones are ``(1 - m) * batch + m * past``, where ``past`` is a
    moving average over earlier synthesised batches; without a past (the first batch) or at m = 0,
    the batch statistics themselves."""
    if momentum_means is None or momentum_vars is None or momentum == 0:
        return list(means), list(variances)
    blend = [(1 - momentum) * x + momentum * past.to(x.dtype) for x, past in zip(means, momentum_means, strict=True)]
    blend_vars = [(1 - momentum) * x + momentum * past.to(x.dtype)
                  for x, past in zip(variances, momentum_vars, strict=True)]
    return blend, blend_vars


def js_divergence(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Jensen-Shannon divergence between the teacher's and student's softmax, natural log, batch mean
    (the textbook JS; ADI's competition term is :func:`adi_competition`)."""
    p = F.softmax(teacher_logits.float(), dim=1)
    q = F.softmax(student_logits.float(), dim=1)
    m = 0.5 * (p + q)
    kl_pm = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(dim=1)
    kl_qm = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(dim=1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def adi_competition(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 3.0,
                    clamp: bool = True) -> Tensor:
    """ADI's competition term R_compete (Yin et al. 2020, Eq. 6-7) as the authors' code computes it
    (NVlabs/DeepInversion, ``cifar10/deepinversion_cifar10.py``), to be minimised:

    ``P = softmax(S(x) / T)``, ``Q = softmax(T(x) / T)`` at ``T = 3``, ``M = (P + Q) / 2`` (from the
    unclamped P and Q); then P, Q and M are clamped to [0.01, 0.99] and
    ``js = 0.5 * KL(M || P) + 0.5 * KL(M || Q)``, each KL summed over classes and averaged over the
    batch (``nn.KLDivLoss(reduction='batchmean')(log P, M)``); the term is ``1 - clamp(js, 0, 1)``.
    (The code's "JS" is KL(M || .), not the textbook KL(. || M): its value is what is minimised.)
    ``clamp=False``: ``1 - js`` -- the DataFree re-implementation's ``-jsdiv(S, T, T=3)`` plus one, whose
    gradient does not vanish where js > 1 (two confident, opposite predictions).
    """
    p = F.softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    m = 0.5 * (p + q)
    p, q, m = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99), m.clamp(0.01, 0.99)
    kl_mp = (m * (m.log() - p.log())).sum(dim=1).mean()
    kl_mq = (m * (m.log() - q.log())).sum(dim=1).mean()
    js = 0.5 * kl_mp + 0.5 * kl_mq
    return 1.0 - (js.clamp(0.0, 1.0) if clamp else js)


def decision_adversarial_loss(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """CMI / FastDFKD adversarial term: ``-mean_i [argmax S(x_i) = argmax T(x_i)] * KL(T(x_i) || S(x_i))``.

    Only samples on which the student already agrees with the teacher are pushed towards
    disagreement (the reference code's "decision adversarial distillation")."""
    agree = (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float()
    return -(kl_per_sample(teacher_logits, student_logits) * agree).mean()


def kd_with_temperature(teacher_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean (the pool methods' student loss)."""
    return kl_per_sample(teacher_logits.float() / temperature, student_logits.float() / temperature).mean() * (
        temperature * temperature)


def contrastive_loss(anchors: Tensor, positives: Tensor, temperature: float) -> Tensor:
    """CMI (Fang et al. 2021, Eq. 6): InfoNCE over instances.

    ``anchors`` and ``positives`` are L2-normalised embeddings, row i of both being two
    views of instance i; every other row of ``positives`` is a negative of anchor i. The
    loss is ``-log exp(a_i.p_i / tau) / sum_j exp(a_i.p_j / tau)``, averaged over anchors.
    CMI appends the embeddings of past samples (its memory bank) as further rows of both,
    which makes them negatives of the new instances (see :func:`cmi_contrastive_loss`).
    """
    logits = anchors.float() @ positives.float().t() / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)


def cmi_contrastive_loss(anchors: Tensor, positives: Tensor, temperature: float, new_rows: int) -> Tensor:
    """CMI's L_cr with a memory: rows ``[:new_rows]`` are this batch, the rest come from the bank.

    As in the authors' code, positives are not back-propagated through (the "global" view is a
    target) and the loss is the mean over new instances plus the mean over bank instances when
    the bank is not empty."""
    logits = anchors.float() @ positives.float().detach().t() / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    per_row = F.cross_entropy(logits, labels, reduction="none")
    if per_row.shape[0] == new_rows:
        return per_row.mean()
    return per_row[:new_rows].mean() + per_row[new_rows:].mean()
