"""The loss terms every training method is built from, each once (open-unlearning's trainer/utils.py).

Plain functions of tensors, so that each has a formula test against a hand computation
(tests/test_losses.py); plugins combine them and never re-derive one:

    answer_nll(logits, labels)            token-mean NLL over the answer tokens (descent: minimise it;
                                          ascent: minimise its negative)
    sequence_nll(logits, labels)          [B] each row's mean NLL over its own answer tokens
    kl_to_reference(logits, ref_logits)   KL(p_θ₀ ‖ p_θ) per answer token, averaged over tokens
    npo(nll, ref_nll, beta)               −(2/β)·mean log σ(β·(NLL_θ − NLL_ref))
    random_direction(width, seed)         the seeded unit vector u of RMU / MIP-Editor
    fixed_target / adaptive_target        c·u, or λ‖h_θ₀‖·u per position
    misdirection(hidden, target)          MSE(h_θ^l(x_f), target)
    retain_state(hidden, ref_hidden)      MSE(h_θ^l(x_r), h_θ₀^l(x_r)); the reference is θ₀, never θ

Logits are [B, T, V] and labels [B, T] as HF models take them: position t predicts labels[t + 1];
labels are mmedit.data.batches.IGNORE (-100) off the answer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmedit.data.batches import IGNORE


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T-1] NLL of each next-token prediction, 0 off the answer; [B, T-1] bool answer mask). Only the
    answer positions' logits are taken to float32 (a large vocabulary costs memory for those alone)."""
    targets = labels[:, 1:]
    answer = targets != IGNORE
    picked = F.cross_entropy(answer_logits(logits, labels), targets[answer], reduction="none")
    return torch.zeros(answer.shape, dtype=picked.dtype, device=picked.device).masked_scatter(answer, picked), answer


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL over all answer tokens of the batch (what HF's .loss computes)."""
    nll, answer = token_nll(logits, labels)
    return nll.sum() / answer.sum()


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: each row's mean NLL over its own answer tokens."""
    nll, answer = token_nll(logits, labels)
    return nll.sum(dim=1) / answer.sum(dim=1).clamp(min=1)


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N, V] float32: the logits that predict the N answer tokens of the batch."""
    return logits[:, :-1][labels[:, 1:] != IGNORE].float()


def kl_to_reference(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p) = Σ_v p_ref (log p_ref − log p), averaged over the N rows of [N, V] logits.
    The reference (θ₀) is the first distribution: mass θ₀ puts where θ puts little is what costs."""
    log_p = logits.float().log_softmax(-1)
    log_ref = reference_logits.float().log_softmax(-1)
    return F.kl_div(log_p, log_ref, log_target=True, reduction="batchmean")


def npo(nll: torch.Tensor, reference_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al. 2024) on per-sequence NLLs: −(2/β)·mean log σ(β·(NLL_θ − NLL_ref)).
    It falls as NLL_θ rises above the reference's, and flattens once it is well above (bounded ascent)."""
    return -(2 / beta) * F.logsigmoid(beta * (nll - reference_nll)).mean()


def random_direction(width: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The seeded random unit vector u (uniform entries, normalised, as RMU's reference code draws it)."""
    u = torch.rand(width, generator=torch.Generator().manual_seed(seed))
    return (u / u.norm()).to(device)


def fixed_target(u: torch.Tensor, c: float, like: torch.Tensor) -> torch.Tensor:
    """c·u at every position of `like` ([N, D])."""
    return (c * u).expand_as(like)


def adaptive_target(reference_hidden: torch.Tensor, u: torch.Tensor, lam: float) -> torch.Tensor:
    """λ·‖h_θ₀(x)‖·u per position: the target scales with θ₀'s own norm there (MIP-Editor's paper)."""
    return lam * reference_hidden.float().norm(dim=-1, keepdim=True) * u


def misdirection(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the forget hidden states [N, D] and their target."""
    return F.mse_loss(hidden.float(), target.float())


def retain_state(hidden: torch.Tensor, reference_hidden: torch.Tensor) -> torch.Tensor:
    """MSE between the edited model's retain hidden states and θ₀'s at the same positions."""
    return F.mse_loss(hidden.float(), reference_hidden.float())
