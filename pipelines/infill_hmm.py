"""Language, exact tier: infilling under a hidden Markov model (issue #16, Tier A).

A seeded HMM (``num_states`` hidden states, V tokens) generates sequences x · z · y: a prefix x
(``x_length`` tokens), an infill z (L = ``infill_length``) and a suffix y (``y_length``). The
condition is the context (x, y); the posterior fills in z.

- Prior p_θ(z | x): a ``TokenTransformer`` pretrained (the masked family's ELBO) on HMM (x, z)
  pairs. It reads the x columns of the condition only, so it cannot see y.
- Posterior: ``posterior_network`` = the frozen prior + a residual transformer over
  (x, y, x_t) whose zero-initialised head makes it start equal to the prior: y reaches the
  posterior through it alone.
- Reward: log r(z; x, y) = log p_HMM(y | x, z), by the forward algorithm.
- Target: p_θ(z | x) · r^β / Z(x, y).

All of it is exact: with V^L infills per context (3125 by default), the learned prior's
marginal, the target and its log Z(c), the posterior's marginal (``exact_marginal``, dynamic
programming) and the Bayes infill p_HMM(z | x, y) (a reference: the target of a perfect prior)
are computed per evaluation context.

``cond`` is the context one-hot, float32 ``[n_x + n_y, V]`` (x's tokens, then y's): the learned
log Z(c) (``log_z: {kind: mlp}``) then reads one-hot features rather than ids cast to floats,
whose magnitudes mean nothing. Training draws contexts from ``num_train_contexts`` fixed ones;
evaluation reports on ``num_eval_contexts`` others, held out (never drawn in training), so every
figure is one of the amortised posterior and log Z(c) on contexts they were not trained on.
"""

from __future__ import annotations

import copy
import itertools
import time
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, \
    model_validator
from torch import Tensor, nn

from rtb_ray.config import AdapterConfig, ConfigError
from rtb_ray.discrete import MaskedCategorical, TokenTransformer
from rtb_ray.pretrain import (PriorCheckpointConfig, load_or_pretrain, pretrain_prior,
                              read_checkpoint, save_prior)
from rtb_ray.tasks import EvalContext

MAX_INFILLS = 100_000  # exact evaluation enumerates V^L infills per context
MAX_DP_STATES = 2_000_000  # exact_marginal's work bound (the "schedule" mode's pairs per step)


# -- data ------------------------------------------------------------------------------------------
def check_tokens(field: str, rows: Sequence[Sequence[int]] | Tensor, length: int,
                 vocab_size: int, names: Sequence[str] | None = None) -> Tensor:
    """Rows of token ids as int64 ``[n, length]``; a one-line ValueError naming ``field``, the
    first bad row and position otherwise: a wrong length, the mask id (V: never data) or an id
    outside 0..V−1. ``names``: what each position is called (``x[0]``...). ``field`` empty: the
    message starts at the row (pydantic puts the field's path before it)."""
    at = f"{field}: " if field else ""
    if not isinstance(rows, Tensor):
        for i, row in enumerate(rows):
            if len(row) != length:
                raise ValueError(f"{at}row {i} has {len(row)} tokens, expected {length}")
        rows = torch.tensor([list(r) for r in rows], dtype=torch.int64).reshape(-1, length)
    elif rows.dim() != 2 or rows.shape[1] != length:
        raise ValueError(f"{at}rows of {list(rows.shape[1:])} tokens, expected [{length}]")
    bad = (rows < 0) | (rows >= vocab_size)
    if bad.any():
        i, j = (int(k) for k in bad.nonzero()[0])
        v = int(rows[i, j])
        what = (f"the mask id ({vocab_size}), which data never holds" if v == vocab_size
                else f"not a token id 0..{vocab_size - 1}")
        where = names[j] if names is not None else f"position {j}"
        raise ValueError(f"{at}row {i}, {where}: {v} is {what}")
    return rows.long()


class HMM:
    """A hidden Markov model over tokens: ``initial [H]``, ``transition [H, H]`` (rows: from),
    ``emission [H, V]``, float64."""

    def __init__(self, initial: Tensor, transition: Tensor, emission: Tensor) -> None:
        self.initial, self.transition, self.emission = initial, transition, emission
        self.vocab_size = emission.shape[1]

    @classmethod
    def seeded(cls, num_states: int, vocab_size: int, seed: int, stickiness: float,
               concentration: float) -> "HMM":
        """Transitions stay with probability ≥ ``stickiness`` (so the hidden state at the end
        of z, which z's tokens reveal, carries over to y: y depends on z); each state's emission
        is a Dirichlet(``concentration``) draw (small: peaked, so tokens reveal states)."""
        rng = np.random.default_rng(seed)
        h = num_states
        initial = rng.dirichlet(np.ones(h))
        transition = stickiness * np.eye(h) + (1 - stickiness) * rng.dirichlet(np.ones(h), h)
        emission = rng.dirichlet(np.full(vocab_size, concentration), h)
        return cls(*(torch.tensor(a, dtype=torch.float64) for a in
                     (initial, transition, emission)))

    def sample(self, n: int, length: int, generator: torch.Generator) -> Tensor:
        """``n`` sequences ``[n, length]`` int64."""
        tokens = torch.empty(n, length, dtype=torch.int64)
        state = torch.multinomial(self.initial.expand(n, -1), 1, generator=generator)[:, 0]
        for t in range(length):
            tokens[:, t] = torch.multinomial(self.emission[state], 1, generator=generator)[:, 0]
            state = torch.multinomial(self.transition[state], 1, generator=generator)[:, 0]
        return tokens

    def prefix_log_probs(self, tokens: Tensor) -> Tensor:
        """log p(tokens[:, :t+1]) for every t, ``[n, length]`` float64: the forward algorithm,
        normalised at each step (the normalisers are the conditional probabilities)."""
        emit = self.emission.T.to(tokens.device)[tokens]  # [n, length, H]: p(token_t | h)
        transition = self.transition.to(tokens.device)
        alpha = self.initial.to(tokens.device) * emit[:, 0]
        steps = []
        for t in range(tokens.shape[1]):
            if t:
                alpha = (alpha @ transition) * emit[:, t]
            norm = alpha.sum(-1, keepdim=True)  # p(token_t | tokens_<t)
            alpha = alpha / norm
            steps.append(norm[:, 0].log())
        return torch.stack(steps, 1).cumsum(1)


# -- networks --------------------------------------------------------------------------------------
class ResidualPosterior(nn.Module):
    """The frozen prior (it reads x) plus a residual transformer that reads the whole context
    (x, y) and x_t; the residual's head starts at zero, so the posterior starts equal to the
    prior exactly, and only the residual trains."""

    def __init__(self, prior: nn.Module, residual: TokenTransformer) -> None:
        super().__init__()
        self.prior = prior.requires_grad_(False)
        self.residual = residual

    def forward(self, x: Tensor, t_index: Tensor | int, cond: Tensor | None = None) -> Tensor:
        return self.prior(x, t_index, cond) + self.residual(x, t_index, cond)


# -- config ----------------------------------------------------------------------------------------
class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(512, ge=1)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0


class Config(PriorCheckpointConfig):
    """Settings of the HMM infilling task (the ``task:`` section of a run config)."""

    name: Literal["infill_hmm"] = "infill_hmm"
    num_states: int = Field(3, ge=1, le=64, description="H, hidden states of the HMM")
    vocab_size: int = Field(5, ge=2, le=64, description="V, tokens 0..V-1 (V is the mask id)")
    x_length: int = Field(4, ge=1, le=64, description="prefix tokens (the prior reads them)")
    infill_length: int = Field(5, ge=1, le=16, description="L, the infill z")
    y_length: int = Field(3, ge=1, le=64, description="suffix tokens (only the posterior reads)")
    hmm_seed: int = 2
    stickiness: float = Field(0.6, ge=0, lt=1, description="transitions stay at least this often")
    emission_concentration: float = Field(0.2, gt=0, description="Dirichlet of each emission row")
    data_seed: int = Field(1, description="draws the training and evaluation contexts")
    num_train_contexts: int = Field(512, ge=1, le=100_000)
    num_eval_contexts: int = Field(16, ge=1, le=1000)
    train_contexts: list[list[int]] | None = Field(
        None, min_length=1, description="explicit training contexts, x's tokens then y's "
                                        "(default: num_train_contexts drawn from the HMM)")
    eval_contexts: list[list[int]] | None = Field(
        None, min_length=1, description="explicit evaluation contexts, x's tokens then y's "
                                        "(default: num_eval_contexts others drawn from the HMM)")
    unmask: Literal["one", "schedule"] = "one"
    num_steps: int | None = Field(None, ge=1, le=1000,
                                  description="T for unmask=schedule (default L); 'one': L")
    dim: int = Field(32, ge=1, description="the prior transformer's width")
    depth: int = Field(2, ge=0)
    heads: int = Field(4, ge=1)
    residual_dim: int = Field(32, ge=1, description="the posterior's residual transformer")
    residual_depth: int = Field(2, ge=0)
    pretrain: PretrainConfig = PretrainConfig()

    @field_validator("train_contexts", "eval_contexts")
    @classmethod
    def _tokens(cls, v: list[list[int]] | None, info: ValidationInfo) -> list[list[int]] | None:
        sizes = [info.data.get(k) for k in ("vocab_size", "x_length", "y_length")]
        if v is None or None in sizes:  # a size that failed has its own error
            return v
        vocab, nx, ny = sizes
        check_tokens("", v, nx + ny, vocab, context_names(nx, ny))
        return v

    @model_validator(mode="after")
    def _sizes(self) -> "Config":
        v, length = self.vocab_size, self.infill_length
        if v**length > MAX_INFILLS:
            raise ValueError(f"vocab_size, infill_length: exact evaluation enumerates V^L = "
                             f"{v}^{length} infills, more than {MAX_INFILLS}")
        if self.unmask == "one" and self.num_steps not in (None, length):
            raise ValueError(f"num_steps: unmask 'one' takes L = {length} steps")
        for width, name in ((self.dim, "dim"), (self.residual_dim, "residual_dim")):
            if width % self.heads:
                raise ValueError(f"{name} ({width}) must be a multiple of heads ({self.heads})")
        return self

    @property
    def steps(self) -> int:
        return self.num_steps or self.infill_length

    def spec(self) -> dict:
        """Everything the prior checkpoint depends on (the contexts are not: the prior is
        trained on the HMM's own sequences)."""
        return {"num_states": self.num_states, "vocab_size": self.vocab_size,
                "x_length": self.x_length, "infill_length": self.infill_length,
                "y_length": self.y_length, "hmm_seed": self.hmm_seed,
                "stickiness": self.stickiness,
                "emission_concentration": self.emission_concentration, "unmask": self.unmask,
                "num_steps": self.steps, "dim": self.dim, "depth": self.depth,
                "heads": self.heads, "pretrain": self.pretrain.model_dump()}


def context_names(x_length: int, y_length: int) -> list[str]:
    """What each column of a context is: ``x[0]``... then ``y[0]``..."""
    return [f"x[{i}]" for i in range(x_length)] + [f"y[{i}]" for i in range(y_length)]


# -- the task --------------------------------------------------------------------------------------
class InfillHMMTask:
    name = "infill_hmm"
    progress_metrics = ("tv_target", "kl_target", "tv_prior_to_target", "mean_log_reward_error")
    baseline_metric = "tv_target"

    def __init__(self, config: Config) -> None:
        self.config = c = config
        self.family = MaskedCategorical(c.infill_length, c.vocab_size, c.unmask, c.steps)
        self.hmm = HMM.seeded(c.num_states, c.vocab_size, c.hmm_seed, c.stickiness,
                              c.emission_concentration)
        self.names = context_names(c.x_length, c.y_length)
        self.train_contexts, self.eval_contexts = self._contexts()
        # every infill, in exact_marginal's index order (Σ z_i V^(L−1−i))
        self.infills = torch.tensor(
            list(itertools.product(range(c.vocab_size), repeat=c.infill_length)))
        self._prior_net: nn.Module | None = None
        self._stats: dict | None = None
        self._exact: dict[tuple[int, ...], dict[str, Tensor]] = {}
        self._beta = 1.0  # the evaluator asks reference_log_z (with the run's β) first

    # -- contexts ----------------------------------------------------------------------------------
    def _contexts(self) -> tuple[Tensor, Tensor]:
        """Training and held-out evaluation contexts ``[n, n_x + n_y]`` int64: the config's,
        checked, or distinct ones drawn from the HMM (evaluation's never among training's)."""
        c = self.config
        width = c.x_length + c.y_length
        gen = torch.Generator().manual_seed(c.data_seed)
        train = (check_tokens("task.train_contexts", c.train_contexts, width, c.vocab_size,
                              self.names) if c.train_contexts is not None
                 else self._draw_contexts(c.num_train_contexts, set(), gen))
        seen = {tuple(r) for r in train.tolist()}
        held = (check_tokens("task.eval_contexts", c.eval_contexts, width, c.vocab_size,
                             self.names) if c.eval_contexts is not None
                else self._draw_contexts(c.num_eval_contexts, seen, gen))
        return train, held

    def _draw_contexts(self, n: int, exclude: set[tuple[int, ...]],
                       gen: torch.Generator) -> Tensor:
        c = self.config
        found: dict[tuple[int, ...], None] = {}  # insertion-ordered: reproducible
        for _ in range(100):
            seq = self.hmm.sample(4 * n, c.x_length + c.infill_length + c.y_length, gen)
            for row in torch.cat([seq[:, :c.x_length], seq[:, -c.y_length:]], 1).tolist():
                if tuple(row) not in exclude:
                    found[tuple(row)] = None
            if len(found) >= n:
                return torch.tensor(list(found)[:n], dtype=torch.int64)
        raise ConfigError(f"task: the HMM gave only {len(found)} distinct new contexts, fewer "
                          f"than the {n} asked for")

    def encode(self, ids: Tensor) -> Tensor:
        """Context ids ``[n, n_x + n_y]`` -> the condition, one-hot float32 ``[n, n_x + n_y, V]``."""
        return F.one_hot(ids, self.config.vocab_size).float()

    def decode(self, cond: Tensor) -> Tensor:
        """The condition (one-hot, or ids) -> context ids ``[n, n_x + n_y]`` int64."""
        return cond.argmax(-1) if cond.dim() == 3 else cond.long()

    def conditions(self, n: int, generator: torch.Generator) -> Tensor:
        rows = torch.randint(0, self.train_contexts.shape[0], (n,), generator=generator)
        return self.encode(self.train_contexts[rows])

    def eval_conditions(self) -> Tensor:
        return self.encode(self.eval_contexts)

    # -- the prior ---------------------------------------------------------------------------------
    def new_prior_network(self) -> TokenTransformer:
        c = self.config
        return TokenTransformer(c.infill_length, c.vocab_size, c.steps, context_length=c.x_length,
                                dim=c.dim, depth=c.depth, heads=c.heads)

    def prior_path(self) -> Path:
        return self.config.prior_path()

    def prior(self) -> TokenTransformer:
        path = self.config.prior_path()
        if path.exists():
            self._check_vocabulary(path)
        state, self._stats = load_or_pretrain(self.config, self.name, self.pretrain)
        net = self.new_prior_network()
        net.load_state_dict(state)
        return net.requires_grad_(False).eval()

    def _check_vocabulary(self, path: Path) -> None:
        """A prior over another vocabulary is refused by name (its ids mean other tokens)."""
        ckpt = read_checkpoint(path, "an rtb-ray prior checkpoint")
        spec = ckpt.get("spec") if isinstance(ckpt, dict) else None
        theirs = spec.get("vocab_size") if isinstance(spec, dict) else None
        if theirs is not None and theirs != self.config.vocab_size:
            raise ValueError(f"prior_checkpoint {path}: a prior over a vocabulary of {theirs} "
                             f"tokens; task.vocab_size is {self.config.vocab_size} (refused)")

    def _net(self) -> nn.Module:
        """The prior, loaded once, for the exact figures."""
        if self._prior_net is None:
            self._prior_net = self.prior()
        return self._prior_net

    def pretrain(self, progress: bool = True) -> dict:
        """The masked family's ELBO on HMM sequences: z given the context (the network reads x
        only); saves the checkpoint with how close the prior is to the HMM's p(z | x)."""
        c, cfg = self.config, self.config.pretrain
        torch.manual_seed(cfg.seed)
        net = self.new_prior_network()
        length = c.x_length + c.infill_length + c.y_length
        names = self.names[:c.x_length] + [f"z[{i}]" for i in range(c.infill_length)] \
            + self.names[c.x_length:]

        def sample(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
            seq = check_tokens("pretraining data (HMM sequences)", self.hmm.sample(n, length, gen),
                               length, c.vocab_size, names)
            z = seq[:, c.x_length:c.x_length + c.infill_length]
            return z, self.encode(torch.cat([seq[:, :c.x_length], seq[:, -c.y_length:]], 1))

        start = time.perf_counter()
        losses = pretrain_prior(self.family, net, sample, steps=cfg.steps,
                                batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                                progress=progress)
        stats = {"pretrain_seconds": time.perf_counter() - start, "last_loss": losses[-1],
                 "tv_to_hmm": self._prior_fit(net.eval(), cfg.seed + 1)}
        save_prior(c.prior_path(), self.name, c.spec(), net, stats)
        return stats

    @torch.no_grad()
    def _prior_fit(self, net: nn.Module, seed: int, n: int = 16) -> float:
        """Mean TV between the prior's exact marginal and the HMM's p(z | x) over ``n`` drawn x."""
        c = self.config
        gen = torch.Generator().manual_seed(seed)
        xs = self.hmm.sample(n, c.x_length + c.infill_length + c.y_length, gen)
        tvs = []
        for ctx in torch.cat([xs[:, :c.x_length], xs[:, -c.y_length:]], 1):
            learned = self._marginal(net, ctx)
            tokens = torch.cat([ctx[:c.x_length].expand(self.infills.shape[0], -1),
                                self.infills], 1)
            exact = self.hmm.prefix_log_probs(tokens)[:, -1].softmax(0)
            tvs.append(0.5 * (learned - exact).abs().sum().item())
        return sum(tvs) / n

    def _marginal(self, net: nn.Module, context: Tensor) -> Tensor:
        """The exact marginal over infills of ``net`` for one context (ids), float64 CPU."""
        device = next(net.parameters()).device
        cond = self.encode(context[None]).to(device)
        return self.family.exact_marginal(net, cond=cond, max_states=MAX_DP_STATES).cpu()

    # -- reward and the exact answer ---------------------------------------------------------------
    def _sequences(self, z: Tensor, context: Tensor) -> Tensor:
        nx = self.config.x_length
        return torch.cat([context[:, :nx], z, context[:, nx:]], 1)

    def log_reward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """log p_HMM(y | x, z) of infills ``x [n, L]`` in contexts ``cond``."""
        if cond is None:
            raise ValueError("infill_hmm is conditional: log_reward needs cond")
        if x.numel() and (x.min() < 0 or x.max() >= self.config.vocab_size):
            raise ValueError(f"infills must be tokens 0..{self.config.vocab_size - 1}")
        seq = self._sequences(x.long(), self.decode(cond).to(x.device))
        cum = self.hmm.prefix_log_probs(seq)
        before_y = self.config.x_length + self.config.infill_length - 1
        return (cum[:, -1] - cum[:, before_y]).float()

    def _exact_of(self, context: tuple[int, ...]) -> dict[str, Tensor]:
        """Per context, over every infill (float64, cached; the prior is frozen): the learned
        prior's log marginal, log r, and the Bayes infill's log p_HMM(z | x, y)."""
        if context not in self._exact:
            ctx = torch.tensor([context])
            n = self.infills.shape[0]
            seq = self._sequences(self.infills, ctx.expand(n, -1))
            cum = self.hmm.prefix_log_probs(seq)
            before_y = self.config.x_length + self.config.infill_length - 1
            self._exact[context] = {
                "log_prior": self._marginal(self._net(), ctx[0]).log(),
                "log_r": cum[:, -1] - cum[:, before_y],
                "log_bayes": cum[:, -1].log_softmax(0)}
        return self._exact[context]

    def _log_target(self, context: tuple[int, ...], beta: float) -> Tensor:
        """log p_θ(z | x) + β log r over every infill, unnormalised."""
        e = self._exact_of(context)
        return e["log_prior"] + beta * e["log_r"]

    def reference_log_z(self, beta: float = 1.0, cond: Tensor | None = None) -> Tensor:
        """log Z(c) = log Σ_z p_θ(z | x) r(z)^β per row, exact (DP over the prior's process)."""
        self._beta = beta
        ids = self.decode(self.eval_conditions() if cond is None else cond.cpu())
        return torch.stack([self._log_target(tuple(r), beta).logsumexp(0)
                            for r in ids.tolist()])

    def target(self, context: tuple[int, ...], beta: float = 1.0) -> Tensor:
        """The target p_θ(z | x)·r^β / Z over every infill, float64."""
        return self._log_target(context, beta).softmax(0)

    @torch.no_grad()
    def evaluate(self, x: Tensor, cond: Tensor | None = None,
                 ctx: EvalContext | None = None) -> dict[str, float]:
        """Exact, per evaluation context (the contexts of ``cond``), with the posterior network
        ``ctx.posterior``: TV(q_φ, target), KL(target ‖ q_φ), |E_q[log r] − E_target[log r]|,
        TV(prior, target) and TV(Bayes infill, target); means over contexts, and the worst;
        ``closer_than_prior``, the share of contexts where TV(q_φ, target) < TV(prior, target).
        (The samples ``x`` are not needed: the exact marginal replaces them.)"""
        if cond is None or ctx is None:
            raise ValueError("infill_hmm evaluates exactly: evaluate needs cond and ctx")
        beta = self._beta
        per: dict[str, list[float]] = {k: [] for k in (
            "tv_target", "kl_target", "mean_log_reward_error", "tv_prior_to_target",
            "tv_bayes_to_target")}
        for context in dict.fromkeys(tuple(r) for r in self.decode(cond).tolist()):
            e = self._exact_of(context)
            target = self.target(context, beta)
            q = self._marginal(ctx.posterior, torch.tensor(context))
            tv = lambda p: 0.5 * (p - target).abs().sum().item()  # noqa: E731
            per["tv_target"].append(tv(q))
            kl = torch.special.xlogy(target, target) - torch.special.xlogy(
                target, q.clamp_min(torch.finfo(torch.float64).tiny))
            per["kl_target"].append(kl.sum().item())
            per["mean_log_reward_error"].append(abs(((q - target) * e["log_r"]).sum().item()))
            per["tv_prior_to_target"].append(tv(e["log_prior"].exp()))
            per["tv_bayes_to_target"].append(tv(e["log_bayes"].exp()))
        out = {k: sum(v) / len(v) for k, v in per.items()}
        out.update({f"{k}_max": max(per[k]) for k in (
            "tv_target", "kl_target", "mean_log_reward_error")})
        out["tv_prior_to_target_min"] = min(per["tv_prior_to_target"])
        # the share of contexts where the posterior is closer to the target than the prior is
        out["closer_than_prior"] = sum(q < p for q, p in zip(
            per["tv_target"], per["tv_prior_to_target"])) / len(per["tv_target"])
        out["tv_ratio"] = out["tv_target"] / max(out["tv_prior_to_target"], 1e-12)
        return out

    # -- the posterior network ---------------------------------------------------------------------
    def posterior_network(self, prior: nn.Module, adapter: AdapterConfig) -> ResidualPosterior:
        """The frozen prior + a zero-initialised residual transformer over (x, y, x_t)."""
        if adapter.kind != "full":
            raise ConfigError(f"train.adapter.kind: {adapter.kind} does not apply to infill_hmm "
                              f"(its posterior is the frozen prior plus a residual network)")
        c = self.config
        residual = TokenTransformer(c.infill_length, c.vocab_size, c.steps,
                                    context_length=c.x_length + c.y_length, dim=c.residual_dim,
                                    depth=c.residual_depth, heads=c.heads)
        return ResidualPosterior(copy.deepcopy(prior), residual)

    # -- picture -----------------------------------------------------------------------------------
    def plot(self, x: Tensor, path: Path, title: str = "", cond: Tensor | None = None) -> None:
        """For up to four contexts: the target's most likely infills, the target's probability
        of each against the samples' frequency."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        assert cond is not None
        ids = self.decode(cond)
        contexts = list(dict.fromkeys(tuple(r) for r in ids.tolist()))[:4]
        fig, axes = plt.subplots(1, len(contexts), figsize=(3.2 * len(contexts), 3), dpi=100,
                                 squeeze=False)
        weights = self.config.vocab_size ** torch.arange(self.config.infill_length - 1, -1, -1)
        for ax, context in zip(axes[0], contexts):
            rows = (ids == torch.tensor(context)).all(1)
            freq = torch.bincount((x[rows].long() * weights).sum(-1),
                                  minlength=self.infills.shape[0]).double() / max(int(rows.sum()), 1)
            target = self.target(context, self._beta)
            top = target.argsort(descending=True)[:8]
            at = np.arange(len(top))
            ax.bar(at - 0.2, target[top].numpy(), 0.4, label="target")
            ax.bar(at + 0.2, freq[top].numpy(), 0.4, label="samples")
            ax.set_xticks(at, ["".join(map(str, self.infills[i].tolist())) for i in top],
                          rotation=60, fontsize=7)
            nx = self.config.x_length
            ax.set_title(f"x={''.join(map(str, context[:nx]))} "
                         f"y={''.join(map(str, context[nx:]))}", fontsize=8)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def make_task(config: Config) -> InfillHMMTask:
    return InfillHMMTask(config)
