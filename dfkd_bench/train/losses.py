"""The loss terms of the MAD paper, as small pure functions.

Every function here is checked against a value computed by hand in
``tests/test_losses.py``. Reductions are part of the definition, so they are
stated on each function:

* per-sample quantities (KL, NLL, NormReg) are averaged over the batch -- the
  expectations of Eqs. 3-8;
* the logit-bound penalties ``max(|v| - bound, 0)`` of Eqs. 10-11 are averaged
  over *all* elements (batch and logit/pixel dimensions). The paper writes
  them on the vector ``S(x)`` without saying how the vector is reduced; the
  mean keeps the term's scale independent of the number of classes and of the
  image size, which is why we chose it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_per_sample(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Eq. 3: ``KL(softmax(T) || softmax(S))`` for each row, natural log.

    Computed from log-softmaxes, so a probability that underflows to 0 in the
    teacher contributes exactly 0 (``p log p -> 0``) and never a NaN.
    """
    log_t = F.log_softmax(teacher_logits.float(), dim=1)
    log_s = F.log_softmax(student_logits.float(), dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1)


def kl_divergence(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Eq. 3 averaged over the batch: the L_KD of ABM, DFKD-Mem and MAD."""
    return kl_per_sample(teacher_logits, student_logits).mean()


def js_divergence_per_sample(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence between rows of two probability matrices.

    ``JS(P, Q) = KL(P || M) / 2 + KL(Q || M) / 2`` with ``M = (P + Q) / 2`` and
    the natural log: exactly ``scipy.spatial.distance.jensenshannon(p, q)**2``.
    ``xlogy`` gives ``0 log 0 = 0``; no other clamping is applied.
    """
    p = p.double()
    q = q.double()
    m = 0.5 * (p + q)
    kl_pm = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(dim=1)
    kl_qm = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(dim=1)
    return 0.5 * (kl_pm + kl_qm)


def nll_loss(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 7: ``-log softmax(T(x))[y]``, averaged over the batch."""
    return F.cross_entropy(teacher_logits.float(), labels)


def norm_regulariser(embeddings: Tensor, gamma: float) -> Tensor:
    """Eq. 8: ``max(||e_y||_2 - gamma * sqrt(d_e), 0)``, averaged over the batch.

    ``embeddings`` holds one gathered class embedding ``e_y`` per row.
    """
    radius = gamma * math.sqrt(embeddings.shape[1])
    return torch.clamp(embeddings.norm(dim=1) - radius, min=0.0).mean()


def bound_penalty(values: Tensor, bound: float) -> Tensor:
    """Eqs. 10-11: ``max(|v| - bound, 0)``, averaged over all elements."""
    return torch.clamp(values.float().abs() - bound, min=0.0).mean()


def batchnorm_moment_loss(
    batch_means: Sequence[Tensor],
    batch_vars: Sequence[Tensor],
    running_means: Sequence[Tensor],
    running_vars: Sequence[Tensor],
) -> Tensor:
    """Eq. 9: ``sum_l ||mu_l - mu_bar_l||^2 + ||w_l - w_bar_l||^2``.

    Squared L2 norms, as the paper writes them (DeepInversion uses the
    unsquared norm; we follow the MAD paper). ``batch_vars`` are the biased
    variances of the synthetic batch, the quantity BatchNorm normalises with.
    """
    if not batch_means:
        raise ValueError("batchnorm_moment_loss needs at least one BatchNorm layer")
    if not (len(batch_means) == len(batch_vars) == len(running_means) == len(running_vars)):
        raise ValueError("batchnorm_moment_loss needs one mean, variance and running pair per layer")
    # The sum over layers of squared norms is the squared norm of the concatenation:
    # a handful of kernels for the whole network instead of ~8 per layer.
    mean_gap = torch.cat([m.float().flatten() for m in batch_means]) - torch.cat(
        [m.float().flatten() for m in running_means])
    var_gap = torch.cat([v.float().flatten() for v in batch_vars]) - torch.cat(
        [v.float().flatten() for v in running_vars])
    return mean_gap.pow(2).sum() + var_gap.pow(2).sum()
