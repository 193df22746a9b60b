"""Transition families: how a policy network turns x_t into a distribution over x_{t+1}.

A family is the only place that knows the kernel. Everything above it (objectives, metrics,
trainer, replay) sees two things: trajectories ``[B, T+1, *event]`` and per-step
log-probabilities ``[B, T]``. A masked-categorical family for token sequences implements the
same protocol (``TransitionFamily``: every member the rest of the code calls).
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Guidance = Callable[[Tensor], Tensor]  # a differentiable log r(x)


@runtime_checkable
class TransitionFamily(Protocol):
    num_steps: int
    event_shape: tuple[int, ...]
    net_out_dim: int
    """Width of the network output the family reads (a task sizes its network by it)."""

    def sample(self, net: nn.Module, n: int, *, cond: Tensor | None = None, explore: float = 0.0,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Run the chain forward. Returns ``states [n, T+1, *event]`` and the summed
        log-probability of each trajectory under the process that sampled it (with exploration
        ``explore`` > 0 that is the explored process, not the network's own)."""
        ...

    def step_log_probs(self, net: nn.Module, states: Tensor, *, cond: Tensor | None = None,
                       steps: Tensor | None = None) -> Tensor:
        """``log p(x_{t+1} | x_t)`` for every trajectory and step ``t`` in ``steps`` (default:
        all), as ``[B, len(steps)]``, from one batched network pass over all (x_t, t) rows."""
        ...

    def backward_sample(self, x: Tensor, *, generator: torch.Generator | None = None
                        ) -> tuple[Tensor, Tensor]:
        """Noise terminal states ``x [n, *event]`` back to x_0 with the fixed noising process.
        Returns trajectories ``[n, T+1, *event]`` ending in ``x`` and the summed log-probability
        of each under that noising process."""
        ...

    def pretrain_loss(self, net: nn.Module, x: Tensor, generator: torch.Generator | None = None,
                      first_steps: int | None = None, cond: Tensor | None = None) -> Tensor:
        """A denoising loss on data ``x [n, *event]`` whose optimum makes the chain end in the
        data distribution (prior pretraining; the mass-covering term). ``first_steps``: only
        chain steps k < first_steps. ``cond [n, ...]``: each row's condition, passed to the
        network as ``step_log_probs`` passes it, so that the optimum is the conditional data
        distribution (rows whose cond is a null condition learn the unconditional one)."""
        ...


@runtime_checkable
class GuidedFamily(TransitionFamily, Protocol):
    """A family whose sampler can be steered by a differentiable reward (classifier guidance,
    the baseline of rtb_ray/baselines.py)."""

    def predict_x0(self, x: Tensor, eps: Tensor, k: int) -> Tensor:
        """The network's estimate of the final state from ``x`` at chain step ``k``."""
        ...

    def sample(self, net: nn.Module, n: int, *, cond: Tensor | None = None, explore: float = 0.0,
               generator: torch.Generator | None = None, guidance: Guidance | None = None,
               guidance_scale: float = 0.0) -> tuple[Tensor, Tensor]:
        """``sample``, with each step moved along ∇ guidance(x̂_0) by ``guidance_scale``."""
        ...


def _normal_log_prob(x: Tensor, mean: Tensor, var: Tensor | float) -> Tensor:
    """Diagonal Gaussian log-density of ``x [n, *event]``, summed over the event (``var``: a
    scalar, or per entry as ``x`` or broadcastable to it)."""
    if isinstance(var, float):
        return -0.5 * ((x - mean).square().flatten(1).sum(-1) / var
                       + x[0].numel() * math.log(2 * math.pi * var))
    terms = (x - mean).square() / var + torch.log(2 * math.pi * var)
    return -0.5 * terms.expand_as(x).flatten(1).sum(-1)


def device_of(net: nn.Module) -> torch.device:
    """Where a network lives: its parameters', else its buffers' (a closed-form prior may have
    only buffers), else the CPU."""
    for tensor in (*net.parameters(), *net.buffers()):
        return tensor.device
    return torch.device("cpu")


class GaussianSteps:
    """What Gaussian families share. A family gives ``moments(net, x, k, cond) -> (mean, var)``
    of ``x_{k+1} | x_k`` and ``backward_step(k) -> (shrink, var)`` of its noising process
    ``x_k | x_{k+1} ~ N(shrink·x_{k+1}, var I)``; sampling, batched log-probabilities and
    backward noising are then the same code."""

    noisy_start = False  # x_0 ~ N(0, I) (drawn, and common to every process) rather than 0

    def __init__(self, event_shape: int | tuple[int, ...], num_steps: int, net_out_dim: int) -> None:
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        self.event_shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
        self.dim = math.prod(self.event_shape)  # entries per state (a flat event's width)
        self.num_steps, self.net_out_dim = num_steps, net_out_dim

    def moments(self, net: nn.Module, x: Tensor, k: Tensor | int,
                cond: Tensor | None = None) -> tuple[Tensor, Tensor | float]:
        raise NotImplementedError

    def guided_moments(self, net: nn.Module, x: Tensor, k: int, cond: Tensor | None,
                       guidance: Guidance, scale: float) -> tuple[Tensor, Tensor | float]:
        raise NotImplementedError(f"{type(self).__name__} has no guidance")

    def backward_step(self, k: int) -> tuple[float, float]:
        raise NotImplementedError

    def sample(self, net: nn.Module, n: int, *, cond: Tensor | None = None, explore: float = 0.0,
               generator: torch.Generator | None = None, guidance: Guidance | None = None,
               guidance_scale: float = 0.0) -> tuple[Tensor, Tensor]:
        device = device_of(net)
        # drawn on the CPU (where seeded generators live), then moved: same numbers on any device
        noise = torch.randn(n, self.num_steps + int(self.noisy_start), *self.event_shape,
                            generator=generator).to(device)
        states = torch.zeros(n, self.num_steps + 1, *self.event_shape, device=device)
        if self.noisy_start:
            states[:, 0], noise = noise[:, 0], noise[:, 1:]
        x = states[:, 0]
        log_behaviour = torch.zeros(n, device=device)
        for k in range(self.num_steps):
            if guidance is None:
                with torch.no_grad():
                    mean, var = self.moments(net, x, k, cond)
            else:
                mean, var = self.guided_moments(net, x, k, cond, guidance, guidance_scale)
            var = var + explore**2
            step = noise[:, k] * (math.sqrt(var) if isinstance(var, float) else var.sqrt())
            x = mean + step
            states[:, k + 1] = x
            # the residual x_{k+1} − mean is the scaled noise itself: no second pass needed
            log_behaviour += _normal_log_prob(step, torch.zeros_like(step), var)
        return states, log_behaviour

    def step_log_probs(self, net: nn.Module, states: Tensor, *, cond: Tensor | None = None,
                       steps: Tensor | None = None) -> Tensor:
        b = states.shape[0]
        if steps is None:
            steps = torch.arange(self.num_steps, device=states.device)
        k = steps.shape[0]
        x = states[:, steps].reshape(b * k, *self.event_shape)
        x_next = states[:, steps + 1].reshape(b * k, *self.event_shape)
        c = None if cond is None else cond.repeat_interleave(k, dim=0)
        mean, var = self.moments(net, x, steps.repeat(b), c)
        return _normal_log_prob(x_next, mean, var).view(b, k)

    @torch.no_grad()
    def backward_sample(self, x: Tensor, *, generator: torch.Generator | None = None
                        ) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        states = torch.zeros(n, self.num_steps + 1, *self.event_shape, device=x.device)
        states[:, -1] = x
        noise = torch.randn(n, self.num_steps, *self.event_shape, generator=generator).to(x.device)
        log_q = torch.zeros(n, device=x.device)
        for k in range(self.num_steps - 1, -1, -1):
            shrink, var = self.backward_step(k)
            if var == 0.0:  # a pinned x_0: it stays 0 and has no density
                continue
            step = noise[:, k] * math.sqrt(var)
            states[:, k] = shrink * states[:, k + 1] + step
            log_q += _normal_log_prob(step, torch.zeros_like(step), var)
        return states, log_q


class PinnedBrownian(GaussianSteps):
    """The pinned Brownian motion of RTB.md: x_0 = 0, ``x_{t+1} ~ N(x_t + dt·u(x_t, t), σ² dt I)``.

    The network predicts the drift ``u``. With ``learn_variance`` it also predicts a log-scale
    ``s`` of the step variance, ``σ² dt · exp(s)`` (its output is ``[u, s]``, 2·dim wide): a
    reward-tilted Brownian motion has slightly smaller step variances than the prior, so only
    then is the exact posterior in the family. A zero-initialised network gives s = 0, the fixed
    variance. Exploration adds ``explore²`` to the per-step variance of the *sampling* process.
    """

    def __init__(self, dim: int, num_steps: int, sigma: float, learn_variance: bool = False) -> None:
        super().__init__(dim, num_steps, 2 * dim if learn_variance else dim)
        self.sigma = sigma
        self.learn_variance = learn_variance
        self.dt = 1.0 / num_steps
        self.step_var = sigma**2 * self.dt

    def moments(self, net: nn.Module, x: Tensor, t: Tensor | int,
                cond: Tensor | None = None) -> tuple[Tensor, Tensor | float]:
        out = net(x, t, cond)
        if not self.learn_variance:
            return x + self.dt * out, self.step_var
        drift, log_scale = out.split(self.dim, dim=-1)
        return x + self.dt * drift, self.step_var * log_scale.clamp(-8.0, 4.0).exp()

    def backward_step(self, t: int) -> tuple[float, float]:
        # Brownian bridge from 0 (time 0) to x (time 1), drawn backwards:
        # x_t | x_{t+1} ~ N(x_{t+1}·t/(t+1), σ² dt · t/(t+1)).
        return t / (t + 1), self.step_var * t / (t + 1)

    def pretrain_loss(self, net: nn.Module, x1: Tensor, generator: torch.Generator | None = None,
                      first_steps: int | None = None, cond: Tensor | None = None) -> Tensor:
        """Bridge matching: given x_1 and x_t on the Brownian bridge from 0, the expected
        increment is dt·(x_1 − x_t)/(1 − t). Regressing the drift on it has the same optimum as
        path maximum likelihood on bridge-noised data, with far less variance. (With
        ``learn_variance`` the variance channels get no gradient here: the prior keeps s = 0.)"""
        # noise from the (CPU) generator, then moved: the learner may run on a GPU
        n, dev = x1.shape[0], x1.device
        k = torch.randint(0, first_steps or self.num_steps, (n,), generator=generator).to(dev)
        t = (k.float() / self.num_steps)[:, None]
        z = torch.randn(x1.shape, generator=generator).to(dev)
        x_t = t * x1 + (self.sigma**2 * t * (1 - t)).sqrt() * z
        drift = net(x_t, k, cond)[..., : self.dim]
        return (drift - (x1 - x_t) / (1 - t)).square().sum(-1).mean()


def linear_betas(num_steps: int) -> Tensor:
    """DDPM's linear schedule (1e-4 … 0.02 over 1000 steps), rescaled to ``num_steps`` steps.

    Not the cosine schedule: its last β is clipped at 0.999, and the first reverse step's mean,
    (x − β/√(1−ᾱ)·ε)/√(1−β), then moves by 31 of its own standard deviations per unit error of ε.
    RTB compares log p_φ with log p_θ along whole paths; that step alone would make the
    difference hypersensitive to the network. Here every step moves by at most one std."""
    scale = 1000 / num_steps
    return torch.linspace(1e-4 * scale, 0.02 * scale, num_steps, dtype=torch.float64).clamp(max=0.5)


class DDPMGaussian(GaussianSteps):
    """The DDPM reverse process as a transition family (RTB.md, "Transitions").

    Chain index k = 0..T−1 is diffusion time s = T − k: states[:, 0] = x_T ~ N(0, I) and
    states[:, T] is the image. The network predicts ε; the step ``x_{s−1} | x_s`` is
    ``N((x_s − β_s/√(1−ᾱ_s)·ε)/√(1−β_s), max(β_s, min_std²) I)`` (the "fixed large" variance).
    The floor keeps the last, near-deterministic steps' log-densities finite; both models use
    this one family, so they share it. The start x_T ~ N(0, I) is common to every process here
    and cancels in every ratio: log-probabilities sum the T transitions only.

    With ``learn_variance`` the network's output is ``[ε, s]`` (2·dim wide) and the step
    variance is ``max(max(β_s, min_std²)·exp(s), min_std²)`` per entry: a reward tilt shrinks
    the step variances, so only then is the exact posterior path in the family. s = 0 (a
    zero-initialised head) gives exactly the fixed variance, and the floor still holds.
    """

    noisy_start = True

    def __init__(self, dim: int, num_steps: int, min_std: float = 1e-3,
                 learn_variance: bool = False) -> None:
        super().__init__(dim, num_steps, 2 * dim if learn_variance else dim)
        self.learn_variance = learn_variance
        self.min_var = min_std**2
        betas = linear_betas(num_steps)  # indexed by s − 1
        alpha_bar = torch.cumprod(1 - betas, 0)
        # per chain index k (s = T − k), float32 for the hot path
        flip = lambda v: v.flip(0).float()  # noqa: E731
        self.betas = flip(betas)
        self.alpha_bar = flip(alpha_bar)
        self.coef_x = flip(1 / (1 - betas).sqrt())
        self.coef_eps = flip(betas / ((1 - betas).sqrt() * (1 - alpha_bar).sqrt()))
        self.var = flip(betas.clamp(min=min_std**2))

    def _at(self, values: Tensor, k: Tensor | int, like: Tensor) -> Tensor:
        if isinstance(k, int):
            return values[k].to(like.device)
        return values.to(like.device)[k][:, None]

    def _mean(self, x: Tensor, eps: Tensor, k: Tensor | int) -> Tensor:
        return self._at(self.coef_x, k, x) * x - self._at(self.coef_eps, k, x) * eps

    def _eps_and_var(self, out: Tensor, k: Tensor | int, like: Tensor) -> tuple[Tensor, Tensor]:
        """Split a network output into ε and the step variance (fixed, or scaled by exp(s))."""
        var = self._at(self.var, k, like)
        if not self.learn_variance:
            return out, var
        eps, log_scale = out.split(self.dim, dim=-1)
        # the same clamp as PinnedBrownian's; the floor again after scaling, so a shrinking
        # posterior cannot make the near-deterministic last steps' densities blow up
        return eps, (var * log_scale.clamp(-8.0, 4.0).exp()).clamp_min(self.min_var)

    def moments(self, net: nn.Module, x: Tensor, k: Tensor | int,
                cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        eps, var = self._eps_and_var(net(x, k, cond), k, x)
        return self._mean(x, eps, k), var

    def guided_moments(self, net: nn.Module, x: Tensor, k: int, cond: Tensor | None,
                       guidance: Guidance, scale: float) -> tuple[Tensor, Tensor]:
        """Classifier guidance with DPS's gradient g = ∇_{x_s} log r(x̂_0(x_s)), normalised as DPS
        normalises its step: the mean moves by ``scale · std · g / rms(g)``. (Unnormalised, g
        carries the 1/√ᾱ_s of Tweedie's estimate, ~10² at the first steps, and any useful scale
        blows up the start.)"""
        x_in = x.detach().requires_grad_()
        with torch.enable_grad():
            eps, var = self._eps_and_var(net(x_in, k, cond), k, x)
            grad, = torch.autograd.grad(guidance(self.predict_x0(x_in, eps, k)).sum(), x_in)
        var = var.detach()  # the step's own (possibly learned) std sets the guidance step's size
        rms = grad.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        return self._mean(x, eps.detach(), k) + scale * var.sqrt() * grad / rms, var

    def predict_x0(self, x: Tensor, eps: Tensor, k: int) -> Tensor:
        """Tweedie's estimate of the clean image from x_s and the predicted noise."""
        a = self.alpha_bar[k].item()
        return (x - math.sqrt(1 - a) * eps) / math.sqrt(a)

    def backward_step(self, k: int) -> tuple[float, float]:
        # the DDPM forward (noising) process, s = T − k: x_s = √(1−β_s)·x_{s−1} + √β_s·z
        beta = self.betas[k].item()
        return math.sqrt(1 - beta), beta

    def pretrain_loss(self, net: nn.Module, x0: Tensor, generator: torch.Generator | None = None,
                      first_steps: int | None = None, cond: Tensor | None = None) -> Tensor:
        """ε-matching (DDPM's simple loss) at a uniformly drawn diffusion time (``first_steps``:
        the noisiest ones)."""
        k = torch.randint(0, first_steps or self.num_steps, (x0.shape[0],), generator=generator)
        a = self.alpha_bar[k][:, None].to(x0.device, x0.dtype)
        z = torch.randn(x0.shape, generator=generator).to(x0.device)
        k = k.to(x0.device)
        # only the ε half is matched: the variance channels (learn_variance) get no gradient,
        # so a zero-initialised head stays at s = 0 and the prior keeps the fixed variance
        eps = net(a.sqrt() * x0 + (1 - a).sqrt() * z, k, cond)[..., : self.dim]
        return (eps - z).square().sum(-1).mean()


class DDIMGaussian(GaussianSteps):
    """DDIM with η = 1 on a diffusers scheduler's re-spaced schedule, as a transition family.

    Chain step k goes from diffusion timestep ``t_k = timesteps[k]`` to ``t_{k+1}`` (the data
    after the last). With ā = ``alphas_cumprod`` and ā' that of the next timestep (the
    scheduler's ``final_alpha_cumprod`` after the last), the step is DDPM's posterior step on the
    re-spaced schedule, which is what ``DDIMScheduler.step(eta=1)`` draws:

        x̂_0 = (x − √(1−ā)·ε) / √ā,   mean = √ā'·x̂_0 + √(1 − ā' − v)·ε,
        v = (1−ā')/(1−ā)·(1 − ā/ā'),  floored at ``min_std²`` (v = 0 at the last step when ā' = 1).

    The network predicts ε from (x, t_k, cond): it receives the diffusion timestep, not the chain
    index, so a UNet trained by diffusers reads what it was trained on. States keep the event's
    shape (``[n, T+1, C, H, W]`` for images). Step log-probabilities are summed over the event,
    as exact RTB needs: a DDPO-style per-dimension mean would make the effective reward
    temperature β_eff = D·β. The start x_{t_0} ~ N(0, I) is common to every process (it cancels
    in their ratios); ``backward_sample`` is the re-spaced forward (noising) process
    ``x_{t_k} | x_{t_{k+1}} ~ N(√(ā/ā')·x_{t_{k+1}}, (1 − ā/ā') I)``.
    """

    noisy_start = True

    def __init__(self, alpha_bar: Tensor, alpha_bar_next: Tensor, timesteps: Tensor,
                 event_shape: int | tuple[int, ...], min_std: float = 1e-3) -> None:
        if not (alpha_bar.shape == alpha_bar_next.shape == timesteps.shape) or alpha_bar.dim() != 1:
            raise ValueError("alpha_bar, alpha_bar_next and timesteps must be [T] each")
        if not bool(((alpha_bar > 0) & (alpha_bar < alpha_bar_next) & (alpha_bar_next <= 1)).all()):
            raise ValueError("each step must denoise: 0 < ā_k < ā_{k+1} <= 1")
        super().__init__(event_shape, alpha_bar.shape[0], math.prod(
            (event_shape,) if isinstance(event_shape, int) else event_shape))
        a, a_next = alpha_bar.double(), alpha_bar_next.double()
        var = (1 - a_next) / (1 - a) * (1 - a / a_next)
        self.timesteps = timesteps.long()
        self.alpha_bar, self.alpha_bar_next = a.float(), a_next.float()
        # mean = coef_x·x − coef_eps·ε, per chain step; float32 for the hot path
        self.coef_x = (a_next / a).sqrt().float()
        self.coef_eps = ((a_next * (1 - a) / a).sqrt() - (1 - a_next - var).clamp_min(0).sqrt()).float()
        self.var = var.clamp_min(min_std**2).float()
        self.noise_var = (1 - a / a_next).float()  # of the noising step x_{t_k} | x_{t_{k+1}}

    @classmethod
    def from_scheduler(cls, scheduler: object, num_steps: int, event_shape: int | tuple[int, ...],
                       min_std: float = 1e-3) -> "DDIMGaussian":
        """The family of a diffusers scheduler (``DDIMScheduler``, or any with its config keys)
        after ``set_timesteps(num_steps)``. Refused in one line: what would make a step
        non-Gaussian (clipping or thresholding x̂_0), a prediction other than ε, and a spacing
        whose next timestep is not where the previous step ended."""
        cfg = scheduler.config
        for key, bad in (("clip_sample", True), ("thresholding", True)):
            if getattr(cfg, key, False) == bad:
                raise ValueError(f"scheduler: {key}={bad} makes a step non-Gaussian (x̂_0 is "
                                 f"clipped); set {key}=False")
        if getattr(cfg, "prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"scheduler: prediction_type={cfg.prediction_type!r}; this family "
                             "reads ε ('epsilon')")
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.long().cpu()
        ratio = cfg.num_train_timesteps // num_steps
        ends = timesteps - ratio  # where diffusers' step(eta=1) from each timestep lands
        if not torch.equal(ends[:-1], timesteps[1:]):
            raise ValueError(f"scheduler: timestep_spacing={cfg.timestep_spacing!r} does not end "
                             "each step on the next timestep; use 'leading' or 'trailing'")
        alphas = scheduler.alphas_cumprod.double().cpu()
        final = torch.tensor([float(scheduler.final_alpha_cumprod)], dtype=torch.float64)
        last = final if ends[-1] < 0 else alphas[ends[-1:]]
        return cls(alphas[timesteps], torch.cat([alphas[timesteps[1:]], last]), timesteps,
                   event_shape, min_std)

    def _at(self, values: Tensor, k: Tensor | int, like: Tensor) -> Tensor:
        """Per-step values for rows of ``like`` ``[n, *event]`` at chain steps ``k``."""
        if isinstance(k, int):
            return values[k].to(like.device)
        return values.to(like.device)[k].view(-1, *[1] * len(self.event_shape))

    def timestep(self, k: Tensor | int) -> Tensor | int:
        """The diffusion timestep the network receives at chain step ``k``."""
        return int(self.timesteps[k]) if isinstance(k, int) else self.timesteps.to(k.device)[k]

    def moments(self, net: nn.Module, x: Tensor, k: Tensor | int,
                cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        eps = net(x, self.timestep(k), cond)
        return self._at(self.coef_x, k, x) * x - self._at(self.coef_eps, k, x) * eps, \
            self._at(self.var, k, x)

    def predict_x0(self, x: Tensor, eps: Tensor, k: int) -> Tensor:
        """Tweedie's estimate of the clean image from x_{t_k} and the predicted noise."""
        a = self.alpha_bar[k].item()
        return (x - math.sqrt(1 - a) * eps) / math.sqrt(a)

    def backward_step(self, k: int) -> tuple[float, float]:
        shrink = (self.alpha_bar[k] / self.alpha_bar_next[k]).sqrt().item()
        return shrink, self.noise_var[k].item()

    def pretrain_loss(self, net: nn.Module, x0: Tensor, generator: torch.Generator | None = None,
                      first_steps: int | None = None, cond: Tensor | None = None) -> Tensor:
        """ε-matching at a uniformly drawn chain step (``first_steps``: the noisiest ones),
        summed over the event."""
        k = torch.randint(0, first_steps or self.num_steps, (x0.shape[0],), generator=generator)
        a = self._at(self.alpha_bar, k, x0).to(x0.dtype)
        z = torch.randn(x0.shape, generator=generator).to(x0.device)
        k = k.to(x0.device)
        eps = net(a.sqrt() * x0 + (1 - a).sqrt() * z, self.timestep(k), cond)
        return (eps - z).square().flatten(1).sum(-1).mean()
