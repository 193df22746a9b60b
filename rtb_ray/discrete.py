"""Masked (absorbing-state) categorical diffusion over token sequences (RTB.md, "Discrete").

States are int64 ``[B, T+1, L]`` over token ids ``0..V-1`` and the mask id ``V``: x_0 is all
masks, x_T has none, and a revealed token never changes. The network reads ``x_t [rows, L]``
and the step and returns ``[rows, L, V+1]``: V token logits per position and one *order logit*
(channel V). Two ways of unmasking:

- ``"one"`` (T = L): each step reveals one masked position i ~ softmax(order logits over the
  masked positions), then its token v ~ softmax(token logits at i):
  ``log p(x_{k+1}|x_k) = log p(i) + log p(v | i)``. Zero order logits are the uniform order.
- ``"schedule"`` (MDLM's linear schedule, T steps): every masked position opens independently
  with probability q_k = 1/(T−k) (so all are open after the last step) and draws its token:
  ``log p = Σ_{opened} [log q_k + log p(v)] + Σ_{still masked} log(1 − q_k)``.
  The order logits are unused.

Exploration ε mixes each categorical with the uniform one, ``(1−ε)·p + ε·uniform``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Unmask = Literal["one", "schedule"]


def _mix_uniform(log_p: Tensor, explore: float, log_uniform: Tensor | float) -> Tensor:
    """``log((1−ε)·p + ε·u)``; ε = 0 returns ``log_p`` itself (no logaddexp in the graph)."""
    if explore == 0.0:
        return log_p
    kept = log_p + math.log1p(-explore) if explore < 1 else torch.full_like(log_p, -math.inf)
    return torch.logaddexp(kept, torch.zeros_like(log_p) + log_uniform + math.log(explore))


def _gumbel(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
            ) -> Tensor:
    """Gumbel noise drawn on the CPU (where seeded generators live), then moved. argmax(log p +
    noise) is an exact draw from p and never picks a −inf entry while a finite one exists."""
    u = torch.rand(shape, generator=generator).clamp_min(torch.finfo(torch.float32).tiny)
    return (-(-u.log()).log()).to(device)


class MaskedCategorical:
    """The masked categorical transition family (``TransitionFamily``); see the module doc."""

    def __init__(self, length: int, vocab_size: int, unmask: Unmask = "one",
                 num_steps: int | None = None) -> None:
        if length < 1 or vocab_size < 1:
            raise ValueError(f"length and vocab_size must be >= 1 (got L={length}, "
                             f"V={vocab_size})")
        if unmask == "one":
            if num_steps not in (None, length):
                raise ValueError(f"unmask='one' reveals one position per step: num_steps must "
                                 f"be the length {length} (got {num_steps})")
            num_steps = length
        elif unmask == "schedule":
            if num_steps is None or num_steps < 1:
                raise ValueError("unmask='schedule' needs num_steps >= 1")
        else:
            raise ValueError(f"unmask must be 'one' or 'schedule' (got {unmask!r})")
        self.length, self.vocab_size, self.unmask = length, vocab_size, unmask
        self.mask_id = vocab_size
        self.num_steps: int = num_steps
        self.event_shape = (length,)
        self.net_out_dim = vocab_size + 1

    # -- the kernel ----------------------------------------------------------------------------
    def _distributions(self, out: Tensor, x: Tensor, explore: float) -> tuple[Tensor, Tensor]:
        """``order [rows, L]`` (log p of revealing each position; −inf where open, and on every
        position of a row with none masked) and ``tokens [rows, L, V]`` (log p of each token)."""
        v = self.vocab_size
        tokens = _mix_uniform(F.log_softmax(out[..., :v].float(), -1), explore, -math.log(v))
        masked = x == self.mask_id
        any_masked = masked.any(-1, keepdim=True)
        # a row without masks gets finite dummy logits, so that log_softmax gives no NaN
        logits = torch.where(masked, out[..., v].float(), -math.inf).where(any_masked, 0.0)
        n_masked = masked.sum(-1, keepdim=True).clamp_min(1)
        order = _mix_uniform(F.log_softmax(logits, -1), explore, -n_masked.log())
        return order.masked_fill(~masked, -math.inf), tokens

    def _transition_log_prob(self, order: Tensor, tokens: Tensor, x: Tensor, x_next: Tensor,
                             k: Tensor) -> Tensor:
        """``log p(x_next | x)`` per row at steps ``k [rows]``; −inf (never NaN, never an error)
        for an impossible transition."""
        v, mask = self.vocab_size, self.mask_id
        masked = x == mask
        opened = masked & (x_next != mask)
        tok_lp = tokens.gather(-1, x_next.clamp(0, v - 1).unsqueeze(-1)).squeeze(-1)  # [rows, L]
        possible = ((x_next >= 0) & (x_next <= mask)).all(-1)
        possible &= ~(~masked & (x_next != x)).any(-1)  # revealed tokens are fixed
        possible &= ~((k == self.num_steps - 1) & (x_next == mask).any(-1))  # all open at T
        if self.unmask == "one":
            possible &= opened.sum(-1) == 1
            pos = opened.int().argmax(-1, keepdim=True)
            lp = (order.gather(-1, pos) + tok_lp.gather(-1, pos)).squeeze(-1)
        else:
            q = (1.0 / (self.num_steps - k).clamp_min(1).float()).unsqueeze(-1)  # [rows, 1]
            stays = masked & ~opened
            # where(), not a product: 0 · log(1 − 1) would be NaN at the last step
            lp = (torch.where(opened, q.log() + tok_lp, 0.0)
                  + torch.where(stays, torch.log1p(-q), 0.0)).sum(-1)
        return lp.masked_fill(~possible, -math.inf)

    # -- the protocol --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, net: nn.Module, n: int, *, cond: Tensor | None = None, explore: float = 0.0,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if not 0.0 <= explore <= 1.0:
            raise ValueError(f"explore is a mixing weight in [0, 1] (got {explore})")
        device = next(net.parameters()).device
        L, T = self.length, self.num_steps
        states = torch.full((n, T + 1, L), self.mask_id, dtype=torch.int64, device=device)
        log_behaviour = torch.zeros(n, device=device)
        rows = torch.arange(n, device=device)
        x = states[:, 0]
        for k in range(T):
            order, tokens = self._distributions(net(x, k, cond), x, explore)
            if self.unmask == "one":
                pos = (order + _gumbel((n, L), generator, device)).argmax(-1)
                tok = (tokens[rows, pos] + _gumbel((n, self.vocab_size), generator, device))
                x_next = x.clone()
                x_next[rows, pos] = tok.argmax(-1)
            else:
                u = torch.rand(n, L, generator=generator).to(device)
                opens = (x == self.mask_id) & (u < 1.0 / (T - k))
                tok = (tokens + _gumbel(tuple(tokens.shape), generator, device)).argmax(-1)
                x_next = torch.where(opens, tok, x)
            log_behaviour += self._transition_log_prob(
                order, tokens, x, x_next, torch.full((n,), k, device=device))
            states[:, k + 1] = x = x_next
        return states, log_behaviour

    def step_log_probs(self, net: nn.Module, states: Tensor, *, cond: Tensor | None = None,
                       steps: Tensor | None = None, explore: float = 0.0) -> Tensor:
        """As the protocol says; ``explore`` > 0 gives the explored process's log-probs (what
        ``sample`` returns as the behaviour log-prob)."""
        b, L = states.shape[0], self.length
        if steps is None:
            steps = torch.arange(self.num_steps, device=states.device)
        k = steps.shape[0]
        x = states[:, steps].reshape(b * k, L)
        x_next = states[:, steps + 1].reshape(b * k, L)
        c = None if cond is None else cond.repeat_interleave(k, dim=0)
        t = steps.repeat(b)
        # out-of-range ids (−inf below) must not reach the embedding
        out = net(x.clamp(0, self.mask_id), t, c)
        order, tokens = self._distributions(out, x, explore)
        return self._transition_log_prob(order, tokens, x, x_next, t).view(b, k)

    def _reveal_steps(self, n: int, generator: torch.Generator | None) -> Tensor:
        """The step at which each position is revealed under the noising process, ``[n, L]``.

        "one": a uniformly random order (the time reversal of a uniform-order prior).
        "schedule": i.i.d. uniform on {0..T−1}, since under the schedule
            P(reveal at k) = Π_{j<k} (1 − 1/(T−j)) · 1/(T−k) = (T−k)/T · 1/(T−k) = 1/T,
        independently per position: the time reversal of the schedule, whose timing does not
        depend on the tokens."""
        if self.unmask == "one":
            return torch.rand(n, self.length, generator=generator).argsort(-1).argsort(-1)
        return torch.randint(0, self.num_steps, (n, self.length), generator=generator)

    def _noising_log_prob(self) -> float:
        """log q(τ | x) of every noising path: −log L! ("one"), −L log T ("schedule")."""
        if self.unmask == "one":
            return -math.lgamma(self.length + 1)
        return -self.length * math.log(self.num_steps)

    @torch.no_grad()
    def backward_sample(self, x: Tensor, *, generator: torch.Generator | None = None
                        ) -> tuple[Tensor, Tensor]:
        if x.dtype != torch.int64 or x.shape[1:] != self.event_shape:
            raise ValueError(f"terminal states must be int64 [n, {self.length}] (got "
                             f"{x.dtype} {list(x.shape)})")
        if x.numel() and (x.min() < 0 or x.max() >= self.vocab_size):
            raise ValueError(f"terminal states must be tokens 0..{self.vocab_size - 1}, "
                             "without masks")
        n = x.shape[0]
        reveal = self._reveal_steps(n, generator).to(x.device)
        k = torch.arange(self.num_steps + 1, device=x.device)
        # x_k keeps the positions revealed before step k
        states = torch.where(reveal[:, None, :] >= k[None, :, None], self.mask_id, x[:, None, :])
        return states, torch.full((n,), self._noising_log_prob(), device=x.device)

    def pretrain_loss(self, net: nn.Module, x: Tensor, generator: torch.Generator | None = None,
                      first_steps: int | None = None, cond: Tensor | None = None) -> Tensor:
        """MDLM's masked-token cross-entropy, weighted to be the exact discrete-time ELBO:

            −log p(x) ≤ E_{k, x_k} [T/(T−k) · Σ_{i masked in x_k} −log p(x_i | x_k, k)],
            k ~ U{0..T−1}, x_k ~ q(x_k | x) (the noising process of ``backward_sample``)

        (given x_k, each masked position is the one revealed at step k with probability
        1/(T−k) in both modes; the order / timing terms cancel against the noising process's
        when the order head is uniform, which it stays: it gets no gradient here). Returned per
        token (÷ L). In "one" mode the weight times the sum is exactly L × the mean over the
        masked positions; the weighting matters for the bound, not for the optimum."""
        n, dev = x.shape[0], x.device
        T = self.num_steps
        k = torch.randint(0, first_steps or T, (n,), generator=generator)
        reveal = self._reveal_steps(n, generator)
        masked = (reveal >= k[:, None]).to(dev)
        k = k.to(dev)
        x_k = torch.where(masked, self.mask_id, x)
        log_p = F.log_softmax(net(x_k, k, cond)[..., : self.vocab_size].float(), -1)
        nll = -log_p.gather(-1, x.unsqueeze(-1)).squeeze(-1)  # [n, L]
        weight = T / (T - k).float()
        return (weight * torch.where(masked, nll, 0.0).sum(-1)).mean() / self.length

    # -- exact marginal ------------------------------------------------------------------------
    @torch.no_grad()
    def exact_marginal(self, net: nn.Module, cond: Tensor | None = None,
                       max_states: int = 100_000) -> Tensor:
        """P(x_T = x) for every complete sequence, ``[V**L]`` float64, index Σ_i x_i·V^(L−1−i)
        (itertools.product order), by dynamic programming over the partial states of each
        step (one network call per step). ``cond``: one condition, ``[1, *cond]``.

        Work: "one" visits at most (V+1)^L partial states; "schedule" enumerates up to (2V+1)^L
        (state, next state) pairs per step. Either count above ``max_states`` is refused."""
        L, V, mask = self.length, self.vocab_size, self.mask_id
        count, what = (((V + 1) ** L, "(V+1)^L partial states") if self.unmask == "one"
                       else ((2 * V + 1) ** L, "(2V+1)^L (state, next state) pairs per step"))
        if count > max_states:
            raise ValueError(f"exact_marginal: L={L}, V={V} ({self.unmask}) has {what} = "
                             f"{count} > max_states={max_states}")
        device = next(net.parameters()).device
        w = (V + 1) ** torch.arange(L - 1, -1, -1, device=device)  # base V+1, position 0 first
        codes = torch.tensor([mask * int(w.sum())], device=device)
        mass = torch.ones(1, dtype=torch.float64, device=device)
        for k in range(self.num_steps):
            x = codes[:, None] // w % (V + 1)  # [S, L]
            c = None if cond is None else cond.expand(x.shape[0], *cond.shape[1:])
            order, tokens = self._distributions(net(x, k, c), x, 0.0)
            src, child, lp = self._children(order, tokens, x, codes, w, k)
            keep = lp > -math.inf
            codes, inv = torch.unique(child[keep], return_inverse=True)
            mass = torch.zeros(codes.shape[0], dtype=torch.float64, device=device).index_add_(
                0, inv, mass[src[keep]] * lp[keep].double().exp())
        x = codes[:, None] // w % (V + 1)  # all open: a zero-mass masked end was dropped above
        index = (x * V ** torch.arange(L - 1, -1, -1, device=device)).sum(-1)
        return torch.zeros(V**L, dtype=torch.float64, device=device).index_add_(0, index, mass)

    def _children(self, order: Tensor, tokens: Tensor, x: Tensor, codes: Tensor, w: Tensor,
                  k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Every (state, next state) pair of one step: source row, next state's code, log-prob."""
        S, L, V = x.shape[0], self.length, self.vocab_size
        v = torch.arange(V, device=x.device)
        if self.unmask == "one":  # reveal position i with token v: code += (v − V)·w_i
            lp = order[:, :, None] + tokens  # [S, L, V], −inf at open positions
            child = codes[:, None, None] + (v - V) * w[:, None]
            src = torch.arange(S, device=x.device)[:, None, None].expand(S, L, V)
            return src.reshape(-1), child.reshape(-1), lp.reshape(-1)
        # schedule: a product over positions, so branch position by position; a masked
        # position stays (log(1 − q)) or opens with token v (log q + log p(v))
        q = 1.0 / (self.num_steps - k)
        choice = torch.cat([math.log(q) + tokens, torch.full((S, L, 1), math.log1p(-q) if q < 1
                                                             else -math.inf, device=x.device)],
                           -1)  # [S, L, V+1], last = stays masked
        src, child = torch.arange(S, device=x.device), codes.clone()
        lp = torch.zeros(S, device=x.device)
        c = torch.arange(V + 1, device=x.device)
        for i in range(L):
            branch = x[src, i] == self.mask_id
            b_src = src[branch].repeat_interleave(V + 1)
            b_c = c.repeat(int(branch.sum()))
            src = torch.cat([src[~branch], b_src])
            child = torch.cat([child[~branch], child[branch].repeat_interleave(V + 1)
                               + (b_c - V) * w[i]])
            lp = torch.cat([lp[~branch], lp[branch].repeat_interleave(V + 1)
                            + choice[b_src, i, b_c]])
        return src, child, lp


class TokenMLP(nn.Module):
    """A small reference network for ``MaskedCategorical``: embeds the L ids (V+1 values) and
    the step, flattens, an MLP, ``[rows, L, V+1]``. The last layer starts at zero, so a fresh
    network is uniform over tokens and over the order. ``cond_dim``: a float condition added
    after the first layer, as ``TimeMLP`` does."""

    def __init__(self, length: int, vocab_size: int, num_steps: int, hidden: int = 128,
                 depth: int = 2, embed: int = 16, cond_dim: int = 0) -> None:
        super().__init__()
        self.length, self.out = length, vocab_size + 1
        self.tokens = nn.Embedding(vocab_size + 1, embed)
        self.time = nn.Embedding(num_steps, hidden)
        self.input = nn.Linear(length * embed, hidden)
        self.cond_input = nn.Linear(cond_dim, hidden, bias=False) if cond_dim else None
        layers = [m for _ in range(depth) for m in (nn.GELU(), nn.Linear(hidden, hidden))]
        self.trunk = nn.Sequential(*layers, nn.GELU(), nn.Linear(hidden, length * self.out))
        nn.init.zeros_(self.trunk[-1].weight)
        nn.init.zeros_(self.trunk[-1].bias)

    def forward(self, x: Tensor, t_index: Tensor | int, cond: Tensor | None = None) -> Tensor:
        """``x [rows, L]`` int64, ``t_index``: one int for all rows or a ``[rows]`` tensor."""
        h = self.input(self.tokens(x).flatten(1))
        h = h + self.time(torch.as_tensor(t_index, device=x.device))
        if self.cond_input is not None:
            if cond is None:
                raise ValueError("this network is conditional: pass cond")
            h = h + self.cond_input(cond)
        return self.trunk(h).view(-1, self.length, self.out)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with plain ``nn.Linear`` q/k/v/out projections
    (not ``nn.MultiheadAttention``, whose fused weights adapters cannot wrap)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, h: Tensor) -> Tensor:
        rows, seq, dim = h.shape

        def split(t: Tensor) -> Tensor:  # [rows, heads, seq, dim / heads]
            return t.view(rows, seq, self.heads, dim // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        return self.out(a.transpose(1, 2).reshape(rows, seq, dim))


class TransformerBlock(nn.Module):
    """Pre-norm: h + attn(LN(h)), then h + MLP(LN(h))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class TokenTransformer(nn.Module):
    """A small bidirectional transformer denoiser for ``MaskedCategorical``: the sequence
    [context tokens; x_t] (token + position embeddings, the step's embedding added to every
    position), pre-norm blocks, and a head over the x_t positions, ``[rows, L, V+1]``. The head
    starts at zero: a fresh network is uniform over tokens and over the order.

    The context is ``cond[:, context_offset : context_offset + context_length]``: only those
    columns are read, so a prior that must not see part of the condition (an infilling prior
    that reads the prefix x, not the suffix y) cannot, by construction. ``cond`` holds token ids
    ``[rows, C]`` or their one-hot encoding ``[rows, C, V]`` (a float condition that an MLP of
    the condition reads well). ``context_length = 0``: an unconditional network."""

    def __init__(self, length: int, vocab_size: int, num_steps: int, context_length: int = 0,
                 context_offset: int = 0, dim: int = 64, depth: int = 2, heads: int = 4,
                 mlp_ratio: int = 2) -> None:
        super().__init__()
        if context_length < 0 or context_offset < 0:
            raise ValueError("context_length and context_offset must be >= 0")
        self.length, self.vocab_size, self.dim = length, vocab_size, dim
        self.context_length, self.context_offset = context_length, context_offset
        self.tokens = nn.Embedding(vocab_size + 1, dim)  # the mask id V included
        self.position = nn.Embedding(context_length + length, dim)
        self.step = nn.Embedding(num_steps, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size + 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def context_ids(self, cond: Tensor | None) -> Tensor | None:
        """The context token ids ``[rows, context_length]`` this network reads from ``cond``."""
        if self.context_length == 0:
            return None
        if cond is None:
            raise ValueError("this network reads a context: pass cond")
        ids = cond.argmax(-1) if cond.dim() == 3 else cond.long()  # one-hot or ids
        start, n = self.context_offset, self.context_length
        if ids.dim() != 2 or ids.shape[1] < start + n:
            raise ValueError(f"cond must hold at least {start + n} tokens per row, as ids "
                             f"[rows, C] or one-hot [rows, C, V] (got {list(cond.shape)})")
        return ids[:, start:start + n]

    def forward(self, x: Tensor, t_index: Tensor | int, cond: Tensor | None = None) -> Tensor:
        """``x [rows, L]`` int64 (ids 0..V, V the mask), ``t_index``: one int for all rows or a
        ``[rows]`` tensor."""
        context = self.context_ids(cond)
        seq = x if context is None else torch.cat([context.to(x.device), x], 1)
        h = self.tokens(seq) + self.position.weight[: seq.shape[1]]
        step = self.step(torch.as_tensor(t_index, device=x.device))
        h = h + step.view(-1, 1, self.dim)  # [1, 1, dim] or [rows, 1, dim]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, -self.length:]))
