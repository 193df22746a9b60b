"""Policy networks: ``net(x_t, t_index, cond) -> output`` over rows of (state, step) pairs."""

from __future__ import annotations

import fnmatch
import math
from typing import Mapping

import torch
from torch import Tensor, nn


def fourier_time_features(num_steps: int, dim: int) -> Tensor:
    """Sin/cos features of t = k / T for k = 0..T-1, geometric frequencies (as in PIS/DDPM)."""
    t = torch.arange(num_steps, dtype=torch.float32) / num_steps
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), dim // 2))
    angles = t[:, None] * freqs[None, :] * (2 * math.pi)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class TimeMLP(nn.Module):
    """An MLP of ``x`` with the time step added as an embedding after the first layer.

    Time is discrete (``t_index`` in ``[0, T)``), so the time branch is evaluated on the ``T``
    distinct steps once per forward and gathered, instead of once per row: a B·T-row batch pays
    for a ``dim -> hidden`` input layer only. The last layer starts at zero, so a fresh network
    is the zero drift (the pinned Brownian motion itself).
    """

    def __init__(self, dim: int, num_steps: int, hidden: int = 128, depth: int = 2,
                 time_features: int = 64, out_dim: int | None = None, cond_dim: int = 0) -> None:
        super().__init__()
        self.num_steps = num_steps
        self.register_buffer("time_features", fourier_time_features(num_steps, time_features))
        self.time_branch = nn.Sequential(nn.Linear(time_features, hidden), nn.GELU(),
                                         nn.Linear(hidden, hidden))
        self.input = nn.Linear(dim, hidden)
        self.cond_input = nn.Linear(cond_dim, hidden, bias=False) if cond_dim else None
        layers = [m for _ in range(depth) for m in (nn.GELU(), nn.Linear(hidden, hidden))]
        self.trunk = nn.Sequential(*layers, nn.GELU(), nn.Linear(hidden, out_dim or dim))
        nn.init.zeros_(self.trunk[-1].weight)
        nn.init.zeros_(self.trunk[-1].bias)

    def forward(self, x: Tensor, t_index: Tensor | int, cond: Tensor | None = None) -> Tensor:
        """``t_index``: one int for all rows (sequential sampling) or a ``[rows]`` tensor."""
        if isinstance(t_index, int):
            time = self.time_branch(self.time_features[t_index : t_index + 1])
        else:
            time = self.time_branch(self.time_features)[t_index]
        h = self.input(x) + time
        if self.cond_input is not None:
            if cond is None:
                raise ValueError("this network is conditional: pass cond")
            h = h + self.cond_input(cond)
        return self.trunk(h)


def _is_conv1d(module: nn.Module) -> bool:
    """A transformers-style ``Conv1D`` (GPT-2's projections): ``x @ weight + bias`` with
    ``weight`` of shape ``[in, out]``. Recognised by duck typing so that transformers stays an
    optional dependency."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[1] == module.nf)


def _is_wrappable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class LoRALinear(nn.Module):
    """``base(x) + (alpha/rank)·x Aᵀ Bᵀ`` with the base frozen (Hu et al., LoRA). B starts at
    zero, so the adapted network starts as the base network.

    ``base`` is an ``nn.Linear`` or a transformers-style ``Conv1D``: both map the last axis
    ``in -> out``, so the adapter only needs the two sizes (the layouts of their weights differ,
    which the base's own forward handles)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            in_features, out_features = base.in_features, base.out_features
        elif _is_conv1d(base):
            in_features, out_features = base.weight.shape
        else:
            raise TypeError(f"LoRA wraps Linear and Conv1D layers, not {type(base).__name__}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.base = base.requires_grad_(False)
        # the adapters live where the base lives and in its dtype, so wrapping a model that is
        # already on a GPU or in half precision needs no extra .to(); A is drawn on the CPU
        # generator first so that a seed gives the same adapters on every device
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        a = torch.randn(rank, self.in_features) / math.sqrt(self.in_features)
        self.lora_a = nn.Parameter(a.to(**like))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * (x @ self.lora_a.T) @ self.lora_b.T


def _matches(pattern: str, path: str) -> bool:
    """The whole path, a dotted suffix of it (``to_out.0`` for ``down.0.attn.to_out.0``), or an
    fnmatch glob over the whole path (``*.attn.c_*``)."""
    return path == pattern or path.endswith("." + pattern) or fnmatch.fnmatchcase(path, pattern)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def add_lora(net: nn.Module, rank: int, alpha: float,
             target_modules: list[str] | None = None) -> int:
    """Wrap the targeted layers of ``net`` (in place) in LoRA adapters and return how many were
    wrapped; afterwards only the adapters are trainable.

    ``target_modules`` are patterns over the dotted paths of ``net.named_modules()`` (see
    ``_matches``); ``None`` targets every ``nn.Linear`` and ``Conv1D`` outside
    ``nn.MultiheadAttention``. Every targeted module must be wrappable and every pattern must
    match something: a misspelt or over-broad target raises ``ValueError`` naming it rather than
    training a different adapter than the one asked for. Everything is checked before ``net``
    is touched, so a refusal leaves it unchanged.
    """
    modules = {path: m for path, m in net.named_modules() if path}
    targets = _lora_targets(modules, target_modules)
    net.requires_grad_(False)
    for path in targets:
        parent_path, _, name = path.rpartition(".")
        parent = net.get_submodule(parent_path) if parent_path else net
        # setattr with a string index also replaces entries of Sequential / ModuleList (to_out.0)
        setattr(parent, name, LoRALinear(modules[path], rank, alpha))
    return len(targets)


def _lora_targets(modules: dict[str, nn.Module], target_modules: list[str] | None
                  ) -> list[str]:
    """The paths ``add_lora`` wraps, of ``modules`` (a network's named modules), in order; a
    ValueError naming the pattern or module when the targets are not what was asked for."""
    # nn.MultiheadAttention reads out_proj.weight (and its packed in_proj) directly in its
    # forward instead of calling the submodule, so a wrapper there would break it or be bypassed
    mha_paths = [path for path, m in modules.items() if isinstance(m, nn.MultiheadAttention)]
    # the bases inside existing adapters are not targets again (add_lora run twice)
    lora_paths = [path for path, m in modules.items() if isinstance(m, LoRALinear)]

    def inside(path: str, parents: list[str]) -> bool:
        return any(path.startswith(parent + ".") for parent in parents)

    targets: list[str] = []
    if target_modules is None:
        targets = [path for path, m in modules.items()
                   if _is_wrappable(m) and not inside(path, mha_paths + lora_paths)]
        if not targets:
            raise ValueError("adapter: the network has no Linear or Conv1D layer outside "
                             "nn.MultiheadAttention, so LoRA has nothing to adapt")
    else:
        if not target_modules:
            raise ValueError("adapter.target_modules is empty, so LoRA would adapt no layer")
        for pattern in target_modules:
            matched = [path for path in modules if _matches(pattern, path)]
            if not matched:
                raise ValueError(f"adapter.target_modules: {pattern!r} matches no module of "
                                 "the network")
            for path in matched:
                module = modules[path]
                by = "" if path == pattern else f" (matched by {pattern!r})"
                kind = type(module).__name__
                if isinstance(module, LoRALinear) or inside(path, lora_paths):
                    raise ValueError(f"adapter.target_modules: {path!r} already has a LoRA "
                                     f"adapter{by}")
                if not _is_wrappable(module):
                    raise ValueError(f"adapter.target_modules: {path!r} is {_article(kind)} "
                                     f"{kind}, which LoRA cannot wrap (it wraps Linear and "
                                     f"Conv1D layers){by}")
                if inside(path, mha_paths):
                    raise ValueError(f"adapter.target_modules: {path!r} is inside "
                                     "nn.MultiheadAttention, which reads its weights "
                                     f"directly{by}")
                if path not in targets:
                    targets.append(path)
    return targets


def own_state(posterior: nn.Module, prior: nn.Module) -> dict[str, Tensor]:
    """The posterior's state dict less the tensors it shares with the prior (the frozen base of
    a LoRA or residual posterior): what the learner publishes to workers and checkpoints. A
    full fine-tune shares nothing, so this is its whole state dict."""
    shared = {t.data_ptr() for t in (*prior.parameters(), *prior.buffers()) if t.numel()}
    return {k: v for k, v in posterior.state_dict().items()
            if not (v.numel() and v.data_ptr() in shared)}


def own_state_to_load(state: Mapping[str, Tensor], posterior: nn.Module, prior: nn.Module
                      ) -> dict[str, Tensor]:
    """The entries of ``state`` (an ``own_state``, or a whole state dict as checkpoints held
    before) that ``load_own_state`` writes into ``posterior``; ValueError naming a key when it
    is the state of another network."""
    own, full = own_state(posterior, prior), posterior.state_dict()
    if set(state) != set(own) and set(state) != set(full):
        missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - full.keys())
        raise ValueError(f"weights of another network (missing {missing[:2]}, unexpected "
                         f"{extra[:2]})")
    for key, mine in own.items():
        if tuple(state[key].shape) != tuple(mine.shape):
            raise ValueError(f"weights of another network ({key}: {tuple(state[key].shape)}, "
                             f"here {tuple(mine.shape)})")
    return {key: state[key] for key in own}


def load_own_state(posterior: nn.Module, prior: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load what ``own_state`` saved; the shared, frozen base is the prior's and stays as is."""
    posterior.load_state_dict(own_state_to_load(state, posterior, prior), strict=False)


class PromptUNet(nn.Module):
    """ε(x_t, t, prompt id) of a text-conditioned UNet (a diffusers ``UNet2DConditionModel``, or
    anything called as ``unet(x, t, encoder_hidden_states=...).sample``), with classifier-free
    guidance inside: ε = ε(x, t, ∅) + w·(ε(x, t, c) − ε(x, t, ∅)).

    The text encoder runs once, outside: ``prompt_states [K+1, L, E]`` are its hidden states of
    the K prompts and, last, of the empty prompt ∅ (id K, the null condition of ``cond_drop``
    pretraining). They are a buffer, so they travel with the prior and are never trained. With
    w = 1 one UNet pass per row suffices; otherwise the conditional and unconditional passes go
    through the UNet as one batch. ``cond`` is int64 ``[n]`` or ``[n, 1]``.
    """

    def __init__(self, unet: nn.Module, prompt_states: Tensor, guidance_scale: float = 1.0) -> None:
        super().__init__()
        if prompt_states.dim() != 3 or prompt_states.shape[0] < 2:
            raise ValueError("prompt_states must be [K+1, L, E]: K >= 1 prompts, then the empty "
                             "prompt")
        self.unet = unet
        self.register_buffer("prompt_states", prompt_states)
        self.guidance_scale = guidance_scale

    @property
    def null_id(self) -> int:
        return self.prompt_states.shape[0] - 1

    def forward(self, x: Tensor, t: Tensor | int, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError("this network is conditional: pass cond (prompt ids)")
        ids = cond.long().reshape(-1)
        # a data-dependent branch: torch.export (MLflow's model format) cannot trace it
        if not torch.compiler.is_compiling() and ids.numel() and (
                ids.min() < 0 or ids.max() > self.null_id):
            raise ValueError(f"prompt id outside 0..{self.null_id} (the last is the empty prompt)")
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device).expand(n) if not isinstance(t, Tensor) or \
            t.dim() == 0 else t.to(x.device)
        w = self.guidance_scale
        if w == 1.0:
            return self.unet(x, t, encoder_hidden_states=self.prompt_states[ids]).sample
        null = torch.full_like(ids, self.null_id)
        states = self.prompt_states[torch.cat([ids, null])]
        both = self.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=states).sample
        eps_cond, eps_null = both[:n], both[n:]
        return eps_null + w * (eps_cond - eps_null)
