"""The embedded synthetic task: a hidden "human", its data, and the exact optimum.

Prompts are ``task.n_prompts`` strings of ``prompt_len`` letters followed by ``>``; a
completion is any string of ``completion_len`` letters of the alphabet (``K ** L`` of them
per prompt, all enumerable). The hidden human:

* likes best the completion ``t(x)`` = the prompt reversed with every letter shifted by one
  (``"cab" -> "bcd"``); the oracle reward gives 1 per letter equal to ``t(x)``, 0.3 per
  letter one step away (cyclically), plus a small fixed idiosyncratic term per (x, y);
* writes demonstrations letter by letter: the liked letter with probability ``demo_skill``,
  else a uniformly random one;
* labels a pair of completions ``y1, y2`` (sampled like demonstrations) by the
  Bradley-Terry model: ``P(y1 preferred) = sigmoid(r*(x, y1) - r*(x, y2))``.

Because every completion can be enumerated, ``pi(y|x)`` of any policy is exact (the sum of
its token log-probs, with the vocabulary restricted to the alphabet), and so is the optimum
of ``J(pi) = E[r] - beta * KL(pi || pi_ref)``: ``pi*(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta)``
with ``J* = E_x[beta * log Z(x)]`` (:func:`kl_regularized_optimum`).
"""

from __future__ import annotations

import itertools
import math

import torch

from fastrlhf.pipeline.config import TaskConfig
from fastrlhf.pipeline.tokenizer import SEP

MATCH_CREDIT = 2.0
NEAR_CREDIT = 0.6
IDIOSYNCRASY = 0.2


IDENTITY = ("seed", "n_prompts", "prompt_len", "completion_len", "alphabet", "demo_skill")
"""The task settings that define the hidden human and its prompts (not data sizes or the model)."""


def task_identity(cfg: TaskConfig) -> dict:
    return {k: getattr(cfg, k) for k in IDENTITY}


class SyntheticTask:
    """Prompts, oracle reward and samplers of the embedded task (see the module docstring).

    Indices, not strings, are the currency: prompt ``i`` in ``range(n_prompts)``, completion
    ``j`` in ``range(K ** L)`` in lexicographic order of :attr:`completions`.
    """

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        K, P, L = len(cfg.alphabet), cfg.prompt_len, cfg.completion_len
        g = torch.Generator().manual_seed(cfg.seed)
        codes = torch.randperm(K ** P, generator=g)[: cfg.n_prompts]
        digits = torch.stack([(codes // K ** (P - 1 - i)) % K for i in range(P)], -1)  # [X, P]
        self.prompt_letters = digits
        self.prompts = ["".join(cfg.alphabet[d] for d in row) + SEP for row in digits.tolist()]
        self.completion_letters = torch.tensor(list(itertools.product(range(K), repeat=L)))  # [C, L]
        self.completions = ["".join(cfg.alphabet[d] for d in row) for row in self.completion_letters.tolist()]
        # the liked completion: the prompt reversed (cycled when L > P), each letter shifted by one
        rev = digits.flip(-1)
        self.target = (rev[:, torch.arange(L) % P] + 1) % K  # [X, L]
        dist = (self.completion_letters[None] - self.target[:, None]) % K  # [X, C, L]
        credit = MATCH_CREDIT * (dist == 0).double() + NEAR_CREDIT * ((dist == 1) | (dist == K - 1)).double()
        quirk = IDIOSYNCRASY * torch.randn(cfg.n_prompts, K ** L, generator=g, dtype=torch.float64)
        self.oracle = credit.sum(-1) + quirk  # [X, C] float64
        probs = torch.full((cfg.n_prompts, L, K), (1 - cfg.demo_skill) / K, dtype=torch.float64)
        probs.scatter_add_(-1, self.target[..., None], torch.full_like(probs[..., :1], cfg.demo_skill))
        self.demo_probs = probs  # [X, L, K] the demonstrator, letter by letter

    @property
    def n_prompts(self) -> int:
        return self.cfg.n_prompts

    @property
    def n_completions(self) -> int:
        return self.completion_letters.shape[0]

    def demonstrator_logprobs(self) -> torch.Tensor:
        """``log p_demo(y|x)`` ``[X, C]`` float64 of the demonstrator."""
        L = self.cfg.completion_len
        per_letter = self.demo_probs[:, torch.arange(L), self.completion_letters]  # [X, C, L]
        return per_letter.log().sum(-1)

    def _index(self, letters: torch.Tensor) -> torch.Tensor:
        K, L = len(self.cfg.alphabet), self.cfg.completion_len
        return (letters * (K ** torch.arange(L - 1, -1, -1))).sum(-1)

    def sample_demonstrations(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` (prompt index, completion index) pairs written by the demonstrator."""
        x = torch.randint(self.n_prompts, (n,), generator=g)
        L, K = self.demo_probs.shape[1:]
        letters = torch.multinomial(self.demo_probs[x].reshape(-1, K).float(), 1, generator=g).view(n, L)
        return x, self._index(letters)

    def sample_preferences(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` labelled pairs: (prompt, chosen, rejected) indices; the label is drawn from the
        Bradley-Terry model on the oracle reward. Both completions come from the demonstrator
        and always differ."""
        x, y1 = self.sample_demonstrations(n, g)
        _, y2 = self.sample_demonstrations(n, g)
        L, K = self.demo_probs.shape[1:]
        for _ in range(100):  # redraw the second completion where the two coincide
            same = y1 == y2
            if not same.any():
                break
            letters = torch.multinomial(self.demo_probs[x[same]].reshape(-1, K).float(), 1, generator=g)
            y2[same] = self._index(letters.view(-1, L))
        else:
            keep = y1 != y2
            x, y1, y2 = x[keep], y1[keep], y2[keep]
        p1 = torch.sigmoid(self.oracle[x, y1] - self.oracle[x, y2])
        first = torch.rand(x.shape[0], generator=g, dtype=torch.float64) < p1
        return x, torch.where(first, y1, y2), torch.where(first, y2, y1)


# ------------------------------------------------------------------------------ theory
def kl_regularized_optimum(ref_logp: torch.Tensor, reward: torch.Tensor, beta: float):
    """The maximizer of ``E_pi[r] - beta * KL(pi || pi_ref)`` per prompt, over all completions.

    Args:
        ref_logp: ``[X, C]`` exact ``log pi_ref(y|x)`` (each row a distribution).
        reward: ``[X, C]``; beta: the KL-regularization strength.

    Returns:
        ``(opt_logp [X, C], value [X])``: ``log pi*(y|x) = log pi_ref + r / beta - log Z(x)``
        and the optimal objective ``beta * log Z(x)``. float64.
    """
    z = ref_logp.double() + reward.double() / beta
    log_z = torch.logsumexp(z, -1)
    return z - log_z[:, None], beta * log_z


def optimum_report(ref_logp: torch.Tensor, reward: torch.Tensor, beta: float,
                   oracle: torch.Tensor | None = None) -> dict[str, float]:
    """:func:`policy_report` of the optimum ``pi*`` itself (its reward, its KL to ``pi_ref``)."""
    return policy_report(kl_regularized_optimum(ref_logp, reward, beta)[0], ref_logp, reward, beta, oracle)


def kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row of exact log-probabilities (0 * log 0 = 0)."""
    p_logp, q_logp = p_logp.double(), q_logp.double()
    p = p_logp.exp()
    return torch.where(p > 0, p * (p_logp - q_logp), 0.0).sum(-1)


def policy_report(logp: torch.Tensor, ref_logp: torch.Tensor, reward: torch.Tensor, beta: float,
                  oracle: torch.Tensor | None = None) -> dict[str, float]:
    """Exact metrics of a policy against the optimum for ``reward`` (averaged over prompts).

    ``J(pi) = E[r] - beta KL(pi || pi_ref)``; ``gap_closed = (J(pi) - J(pi_ref)) / (J* - J(pi_ref))``,
    which equals ``1 - KL(pi || pi*) / KL(pi_ref || pi*)`` since ``J* - J(pi) = beta KL(pi || pi*)``.
    """
    opt_logp, value = kl_regularized_optimum(ref_logp, reward, beta)
    p, p_ref = logp.double().exp(), ref_logp.double().exp()
    j = (p * reward).sum(-1) - beta * kl(logp, ref_logp)
    j_ref = (p_ref * reward).sum(-1)
    out = {
        "reward": (p * reward).sum(-1).mean().item(),
        "kl_ref": kl(logp, ref_logp).mean().item(),
        "kl_opt": kl(logp, opt_logp).mean().item(),
        "kl_opt_ref": kl(ref_logp, opt_logp).mean().item(),
        "J": j.mean().item(),
        "J_ref": j_ref.mean().item(),
        "J_opt": value.mean().item(),
        "gap_closed": ((j - j_ref).mean() / (value - j_ref).mean()).item(),
    }
    if oracle is not None:
        out["oracle_reward"] = (p * oracle).sum(-1).mean().item()
        out["oracle_reward_ref"] = (p_ref * oracle).sum(-1).mean().item()
    return out


def best_of_n_logprobs(ref_logp: torch.Tensor, reward: torch.Tensor, n: int) -> torch.Tensor:
    """Exact ``log P(y)`` of best-of-``n`` sampling from ``pi_ref`` ranked by ``reward``.

    With ``F_le(y)`` / ``F_lt(y)`` the ``pi_ref`` mass of completions with reward ``<=`` / ``<``
    that of ``y``: ``P(y) = (F_le^n - F_lt^n) * pi_ref(y) / (F_le - F_lt)``, i.e. ties at the
    maximum are shared in proportion to ``pi_ref`` (the first of the tied samples wins).
    """
    p = ref_logp.double().exp()
    r = reward.double().contiguous()
    sorted_r, order = torch.sort(r, dim=-1)
    cum = torch.cat([torch.zeros_like(p[:, :1]), p.gather(-1, order).cumsum(-1)], -1).clamp(max=1.0)
    f_le = cum.gather(-1, torch.searchsorted(sorted_r, r, right=True))
    f_lt = cum.gather(-1, torch.searchsorted(sorted_r, r, right=False))
    group = (f_le - f_lt).clamp(min=torch.finfo(torch.float64).tiny)
    return torch.log((f_le.pow(n) - f_lt.pow(n)) * p / group)


def best_of_n_kl_bound(n: int) -> float:
    """``log n - (n - 1) / n``: the KL(best-of-n || pi_ref) of a continuous reward, an upper bound."""
    return math.log(n) - (n - 1) / n
