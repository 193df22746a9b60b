"""Text-to-image, realistic tier: captioned renders of coloured shapes (issue #18, Tier B).

Images are procedural ``3 × size × size`` renders (12 × 12 by default, values in [-1, 1]) of one
shape ∈ {circle, square, triangle} in one colour ∈ {red, green, blue, yellow} on black, at a
random centre and size; all three shapes of one size have the same area. A caption is
"a <colour> <shape>": 12 prompts, id = 3·colour + shape. The empty caption is the null
condition (id 12, the last row of ``PromptUNet.prompt_states``).

- Training split (the prior's data): colour-biased. Each prompt of ``rare_prompts`` (default
  "a red square", "a green triangle", "a blue circle": one per shape) occurs at
  ``rare_fraction`` (1 %) of its natural frequency, so the prior sees red, squares etc. often
  but these pairs almost never, and binds them badly.
- Text: a word tokenizer over the caption grammar (plus <pad>, <bos>, <eos>) and a tiny
  ``transformers.CLIPTextModel`` built from a config and seeded, *not trained*: it runs once,
  and its hidden states of the 12 captions and the empty one are a frozen buffer of the prior.
  A random encoder suffices because its states of different words differ (the final layer
  norm makes each position's state O(1)); the UNet's cross-attention learns to read them, and
  LoRA on to_k / to_v can re-read them. Training it jointly would buy nothing here and would
  make the states a parameter the posterior could drift from the prior's.
- Prior: ``PromptUNet`` around a diffusers ``UNet2DConditionModel`` (~0.25 M weights: two
  levels of 16 and 32 channels, cross-attention at the low level and in the mid block: self-
  attention over the full 12 × 12 grid would cost ~60 % of a CPU forward pass) inside
  ``SkipUNet`` (ε = √(1−ā)·x_t + UNet: stable DDIM samples early in training), ε-matching
  under ``DDIMGaussian`` (η = 1, trailing spacing, T = ``num_steps``) with ``cond_drop`` for
  classifier-free guidance. ``guidance_scale`` 1 (default) is no guidance, so the posterior's
  target is exactly p_prior · r^β. The last DDIM step is deterministic; its std is floored at
  ``min_std`` = 0.1 (pixel noise the oracle and the reward read through). A floor of 0.02 made
  RTB's δ explode (losses ~3000 after 5 steps, against ~4 at 0.1): an explored or noised-back
  row ends ~0.1–0.3 from the last step's mean, so a posterior that moves that mean by Δ changes
  its log-density by ~residual·Δ/σ² per pixel, summed over 432 pixels.
- Reward: a small CNN r_ψ(x, prompt) trained here on synthetic preference pairs, on the
  *natural* (uniform) prompt distribution: of two renders, the one matching more of the
  caption's two attributes wins with probability σ(κ·Δmatches) (Bradley–Terry with soft
  labels, κ = ``reward.margin``). So log r ≈ −κ·(attributes missed), shifted per prompt so
  that renders of the prompt itself score 0 on average: 0, −κ, −2κ (κ = 3 nats by default).
  Images are clamped to [-1, 1] (the renders' range) before scoring.
- Oracle: the renderer's rules on pixels, never the reward network (``oracle``). Dominant
  colour: the palette colour of most foreground pixels by chroma (white or grey pixels count
  against it). Shape: the three shapes rendered at the foreground's centroid with its area;
  the best IoU wins, if ≥ ``ORACLE_MIN_IOU`` and the foreground is no larger than a shape can
  be (blobs, smears and noise are no shape). Oracle accuracy = the share of samples whose
  colour and shape both match the prompt (1.0 on clean renders).

Prior and reward network are one checkpoint (``prior_path()``), with the prior's per-prompt
oracle accuracy and reward in its stats. ``evaluate`` reports per prompt and as means over the
rare and the common prompts: reward, oracle accuracy, diversity (mean pairwise distance in the
reward network's features, over that of renders of the prompt), Fréchet distance in those
features to renders of the prompt.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from rtb_ray.metrics import frechet_distance
from rtb_ray.networks import PromptUNet
from rtb_ray.pretrain import (PriorCheckpointConfig, load_frozen_bundle, pretrain_prior,
                              progress_bar, read_checkpoint, save_prior)
from rtb_ray.tasks import EvalContext
from rtb_ray.transitions import DDIMGaussian

# -- the caption grammar and its tokenizer -------------------------------------------------------
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
PROMPTS = tuple(f"a {c} {s}" for c in COLOURS for s in SHAPES)  # id = 3·colour + shape
NUM_PROMPTS = len(PROMPTS)
SPECIALS = ("<pad>", "<bos>", "<eos>")
PAD, BOS, EOS = 0, 1, 2
WORDS = (*SPECIALS, "a", *COLOURS, *SHAPES)
CAPTION_LENGTH = 5  # <bos> a <colour> <shape> <eos>
# the palette in [0, 1] (images are 2·p − 1); black background
PALETTE = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])


class Tokenizer:
    """One id per word of the caption grammar after <pad>, <bos>, <eos> (0, 1, 2); a caption
    becomes <bos> words <eos> padded to ``CAPTION_LENGTH``; "" is the empty prompt."""

    def __init__(self) -> None:
        self.ids = {w: i for i, w in enumerate(WORDS)}

    def __len__(self) -> int:
        return len(WORDS)

    def encode(self, caption: str) -> list[int]:
        words = caption.split()
        unknown = [w for w in words if w not in self.ids or w in SPECIALS]
        if unknown:
            raise ValueError(f"caption {caption!r}: {unknown[0]!r} is not a word of the caption "
                             f"grammar ({', '.join(WORDS[len(SPECIALS):])})")
        if len(words) + 2 > CAPTION_LENGTH:
            raise ValueError(f"caption {caption!r}: {len(words)} words, more than "
                             f"{CAPTION_LENGTH - 2}")
        ids = [BOS, *(self.ids[w] for w in words), EOS]
        return ids + [PAD] * (CAPTION_LENGTH - len(ids))

    def decode(self, ids: list[int] | Tensor) -> str:
        values = ids.tolist() if isinstance(ids, Tensor) else ids
        return " ".join(WORDS[i] for i in values if i not in (PAD, BOS, EOS))


def prompt_id(caption: str) -> int:
    """The id of a caption "a <colour> <shape>"; ValueError naming an unknown word, or the
    caption when it has the grammar's words in another form."""
    Tokenizer().encode(caption)  # names an unknown word first
    words = caption.split()
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
        raise ValueError(f"caption {caption!r} is not 'a <colour> <shape>'")
    return 3 * COLOURS.index(words[1]) + SHAPES.index(words[2])


def prompt_key(k: int) -> str:
    """A prompt as a metric-name suffix: ``red_square``."""
    return PROMPTS[k][2:].replace(" ", "_")


# -- the renderer --------------------------------------------------------------------------------
# Per unit "radius" r every shape has area π r²: a square of half-side √π/2, an equilateral
# triangle (apex up, centred on its centroid) of side √(4π/√3). Equal areas: size says nothing
# of the shape, and the oracle reads one radius off any shape's area.
SQUARE_HALF = math.sqrt(math.pi) / 2
TRIANGLE_SIDE = math.sqrt(4 * math.pi / math.sqrt(3))
TRIANGLE_HEIGHT = math.sqrt(3) / 2 * TRIANGLE_SIDE
# per unit radius: half-width, extent above and below the centre (y grows downwards)
EXTENTS = torch.tensor([[1.0, 1.0, 1.0], [SQUARE_HALF] * 3,
                        [TRIANGLE_SIDE / 2, 2 * TRIANGLE_HEIGHT / 3, TRIANGLE_HEIGHT / 3]])


@dataclass
class Scenes:
    """What each render shows: shape and colour ids ``[n]``, centre ``[n, 2]`` (x, y in pixels
    from the top left corner) and radius ``[n]`` in pixels."""

    shape: Tensor
    colour: Tensor
    centre: Tensor
    radius: Tensor


def signed_distance(shape: Tensor, centre: Tensor, radius: Tensor, size: int) -> Tensor:
    """Each pixel centre's signed distance (pixels; < 0 inside) to its row's shape,
    ``[n, size, size]``. The triangle's is the largest of its three edges' (exact inside,
    slightly rounded outside its corners: all the anti-aliasing needs)."""
    coords = torch.arange(size, dtype=torch.float32, device=centre.device) + 0.5
    dx = coords[None, None, :] - centre[:, 0, None, None]
    dy = coords[None, :, None] - centre[:, 1, None, None]
    r = radius[:, None, None]
    circle = (dx.square() + dy.square()).sqrt() - r
    square = torch.maximum(dx.abs(), dy.abs()) - SQUARE_HALF * r
    # the sides' outward normals are (±√3/2, −1/2); the apex lies 2H/3 above the centroid
    apex = dy + 2 * TRIANGLE_HEIGHT / 3 * r
    sides = math.sqrt(3) / 2 * dx.abs() - apex / 2
    triangle = torch.maximum(sides, dy - TRIANGLE_HEIGHT / 3 * r)
    k = shape[:, None, None]
    return torch.where(k == 0, circle, torch.where(k == 1, square, triangle))


def coverage(shape: Tensor, centre: Tensor, radius: Tensor, size: int,
             antialias: bool = True) -> Tensor:
    """How much of each pixel the shape covers, ``[n, size, size]`` in [0, 1]: a one-pixel
    linear ramp across the edge (anti-aliased), or inside / outside."""
    d = signed_distance(shape, centre, radius, size)
    return (0.5 - d).clamp(0, 1) if antialias else (d < 0).float()


def render(scenes: Scenes, size: int, antialias: bool = True) -> Tensor:
    """The images of ``scenes``, ``[n, 3, size, size]`` in [-1, 1] (black background)."""
    cover = coverage(scenes.shape, scenes.centre, scenes.radius, size, antialias)
    colour = PALETTE.to(cover.device)[scenes.colour] * 2  # − (−1): the colour over black
    return -1 + cover[:, None] * colour[:, :, None, None]


def draw_scenes(shape: Tensor, colour: Tensor, size: int, radius_range: tuple[float, float],
                generator: torch.Generator) -> Scenes:
    """Scenes of the given shapes and colours, each at a uniform radius in ``radius_range``
    (fractions of ``size``) and a uniform centre that keeps the shape half a pixel inside."""
    n = shape.shape[0]
    lo, hi = radius_range
    radius = (lo + (hi - lo) * torch.rand(n, generator=generator)) * size
    half_width, up, down = (EXTENTS[shape] * radius[:, None]).unbind(1)
    u = torch.rand(n, 2, generator=generator)
    x = half_width + 0.5 + u[:, 0] * (size - 1 - 2 * half_width)
    y = up + 0.5 + u[:, 1] * (size - 1 - up - down)
    return Scenes(shape, colour, torch.stack([x, y], 1), radius)


# -- the oracle ----------------------------------------------------------------------------------
ORACLE_FLOOR = 0.2  # brightest channel below this (in [0, 1]): background
ORACLE_MIN_IOU = 0.5  # below: not a shape of the grammar
ORACLE_MIN_AREA = 0.5  # foreground below this share of the smallest shape's area: nothing drawn
ORACLE_MAX_AREA = 1.5  # above this share of the largest shape's area: no shape (a smear)
ORACLE_MIN_PURITY = 0.5  # the dominant colour needs this share of the foreground's votes
ORACLE_MAX_CHROMA_DIST = 0.5  # a pixel's chroma this close to a palette colour is that colour


def oracle(x: Tensor, size: int, min_radius: float, max_radius: float
           ) -> tuple[Tensor, Tensor]:
    """The renderer's rules read back from pixels: each image's dominant colour and its shape
    (ids; −1: none), from ``x [n, 3, size, size]``. Never uses a learned network.

    Foreground: a pixel's brightest channel (its coverage, on a render), zero below
    ``ORACLE_FLOOR`` (background noise). Colour: the palette colour nearest each pixel's chroma
    (its RGB over its brightest channel) if within ``ORACLE_MAX_CHROMA_DIST`` (white or grey is
    none), votes weighted by foreground; none without a majority (``ORACLE_MIN_PURITY``).
    Shape: the three shapes rendered (anti-aliased: sub-pixel geometry) at the foreground's
    centroid with the radius of its area, floored alike; the best IoU against the foreground,
    if ≥ ``ORACLE_MIN_IOU`` and the area is at most ``ORACLE_MAX_AREA`` × the largest shape's
    (``max_radius`` × size). Less foreground than ``ORACLE_MIN_AREA`` × the smallest shape's
    area (``min_radius`` × size): neither. Exact on anti-aliased renders; hard-edged ones
    (``antialias: false``) of a few pixels are ambiguous (a 5-pixel disk is nearly a square):
    ~94 % read right at 12 × 12, ~100 % at 16 × 16."""
    p = (x.detach().float().cpu().clamp(-1, 1) + 1) / 2
    strength = p.amax(1)  # [n, S, S]
    mask = torch.where(strength > ORACLE_FLOOR, strength, 0.0)
    chroma = p / strength.clamp_min(1e-3)[:, None]
    dist = (chroma[:, None] - PALETTE[None, :, :, None, None]).square().sum(2)  # [n, 4, S, S]
    nearest_dist, nearest = dist.min(1)
    # a pixel of no palette colour (white, grey, cyan...) votes for none, against the majority
    nearest = torch.where(nearest_dist <= ORACLE_MAX_CHROMA_DIST**2, nearest, len(COLOURS))
    votes = (F.one_hot(nearest, len(COLOURS) + 1) * mask[..., None]).sum((1, 2))
    purity, colour = (votes[:, :-1] / votes.sum(1, keepdim=True).clamp_min(1e-6)).max(1)
    area = mask.sum((1, 2))
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    safe = area.clamp_min(1e-6)
    centre = torch.stack([(mask.sum(1) * coords).sum(1) / safe,
                          (mask.sum(2) * coords).sum(1) / safe], 1)
    radius = (area / math.pi).sqrt()
    ious = []
    for k in range(len(SHAPES)):
        t = coverage(torch.full_like(colour, k), centre, radius, size)
        t = torch.where(t > ORACLE_FLOOR, t, 0.0)
        union = torch.maximum(mask, t).sum((1, 2)).clamp_min(1e-6)
        ious.append(torch.minimum(mask, t).sum((1, 2)) / union)
    best, shape = torch.stack(ious, 1).max(1)
    drawn = area >= ORACLE_MIN_AREA * math.pi * (min_radius * size) ** 2
    compact = area <= ORACLE_MAX_AREA * math.pi * (max_radius * size) ** 2
    colour = torch.where(drawn & (purity >= ORACLE_MIN_PURITY), colour, -1)
    shape = torch.where(drawn & compact & (best >= ORACLE_MIN_IOU), shape, -1)
    return colour, shape


# -- networks ------------------------------------------------------------------------------------
class RewardNet(nn.Module):
    """r_ψ(x, prompt): a small CNN's ``features`` (also the feature space of diversity and of the
    Fréchet distance), a linear score per prompt, less a per-prompt ``offset`` (set after
    training: renders of the prompt score 0 on average)."""

    def __init__(self, width: int, features: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(3), nn.Flatten(),
            nn.Linear(2 * width * 9, features), nn.GELU())
        self.head = nn.Linear(features, NUM_PROMPTS)
        self.register_buffer("offset", torch.zeros(NUM_PROMPTS))

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.clamp(-1, 1))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        scores = self.head(self.features(x))
        return scores.gather(1, ids[:, None]).squeeze(1) - self.offset[ids]


@dataclass
class UNetOutput:
    sample: Tensor


class SkipUNet(nn.Module):
    """ε(x_t, t, text) = √(1 − ā_t)·x_t + unet(x_t, t, text): the UNet learns the rest,
    √ā_t·v (v-prediction's target, scaled), which is ~0 at the noisiest steps. Why: there the
    DDIM step multiplies ε's error by ~2 per step and x_t by ~2.6 (trailing spacing starts at
    ā = 4·10⁻⁵), so a plain ε-UNet must learn ε ≈ x_t almost exactly before its samples stop
    diverging (measured: after 180 steps its ε error of 0.04 per pixel at t = 999 gave samples
    of std 7.5); with the skip, a UNet that outputs ~0 there is already right. Same family,
    same ε-matching loss; ``unet`` is any module called as diffusers' UNets are."""

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("skip", (1 - alphas_cumprod.float()).sqrt())

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor) -> UNetOutput:
        rest = self.unet(x, t, encoder_hidden_states=encoder_hidden_states).sample
        skip = self.skip[torch.as_tensor(t, device=x.device).long()]
        return UNetOutput(rest + skip.view(-1, *[1] * (x.dim() - 1)) * x)


def _transformers():
    """transformers, offline: nothing is ever downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers


# -- config --------------------------------------------------------------------------------------
class UNetConfig(BaseModel):
    """The diffusers ``UNet2DConditionModel``: plain ResNet blocks at full resolution,
    cross-attention (and self-attention) blocks at every lower level and in the mid block."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    block_out_channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1,
                                          max_length=4, description="channels per level")
    layers_per_block: int = Field(1, ge=1, le=4, description="ResNet blocks per level")
    attention_heads: int = Field(8, ge=1, description="heads of each attention layer "
                                                      "(diffusers' attention_head_dim)")
    norm_num_groups: int = Field(4, ge=1, description="GroupNorm groups")


class TextConfig(BaseModel):
    """The CLIP text encoder (random, seeded, run once): its states are the prompt states."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    hidden_size: int = Field(32, ge=4, description="also the UNet's cross_attention_dim")
    layers: int = Field(1, ge=1, le=12, description="transformer layers")
    heads: int = Field(2, ge=1, description="attention heads")
    intermediate_size: int = Field(64, ge=4, description="MLP width")
    seed: int = Field(0, description="draws the encoder's weights")


class PretrainConfig(BaseModel):
    """ε-matching of the prior on the training split."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(2500, ge=1, description="optimiser steps")
    batch_size: int = Field(128, ge=1, description="renders per step")
    lr: float = Field(2e-3, gt=0, description="Adam, cosine schedule")
    cond_drop: float = Field(0.1, ge=0, le=1, description="share of rows trained on the empty "
                                                          "prompt (classifier-free guidance)")
    seed: int = Field(0, description="network init, data and noise")
    stats_samples: int = Field(128, ge=2, le=100_000,
                               description="prior samples per prompt for the stored stats")


class RewardConfig(BaseModel):
    """The reward CNN and its Bradley–Terry training on preference pairs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    width: int = Field(16, ge=1, description="channels of the first convolutions")
    features: int = Field(32, ge=2, description="feature dimension (diversity, Fréchet)")
    margin: float = Field(3.0, gt=0, description="κ: P(more matches wins) = σ(κ·Δmatches); "
                                                  "log r ≈ −κ per attribute missed")
    noise_std: float = Field(0.3, ge=0, description="renders get N(0, (u·noise_std)²) pixel "
                                                    "noise, u ~ U(0, 1): samples are not clean")
    steps: int = Field(1500, ge=1, description="optimiser steps")
    batch_size: int = Field(128, ge=1, description="pairs per step")
    lr: float = Field(2e-3, gt=0, description="Adam, cosine schedule")
    seed: int = Field(0, description="network init and pairs")


class Config(PriorCheckpointConfig):
    """Settings of the shapes text-to-image task (the ``task:`` section of a run config)."""

    name: Literal["t2i_shapes"] = "t2i_shapes"
    size: int = Field(12, ge=8, le=32, description="images are 3 × size × size")
    antialias: bool = Field(True, description="renders with a one-pixel soft edge")
    min_radius: float = Field(0.2, gt=0, description="smallest shape radius, × size")
    max_radius: float = Field(0.3, gt=0, description="largest shape radius, × size")
    rare_prompts: list[str] = Field(
        default_factory=lambda: ["a red square", "a green triangle", "a blue circle"],
        description="captions the training split holds at rare_fraction of their frequency")
    rare_fraction: float = Field(0.01, ge=0, le=1, description="rare prompts' frequency in the "
                                                               "prior's data, × the others'")
    rare_weight: float = Field(1.0, gt=0, description="conditions(): rare prompts' weight, × "
                                                      "the others' (1: uniform)")
    num_steps: int = Field(10, ge=2, le=100, description="T, DDIM steps (trailing spacing)")
    num_train_timesteps: int = Field(1000, ge=10, le=10_000,
                                     description="the scheduler's diffusion timesteps")
    min_std: float = Field(0.1, gt=0, description="floor of a step's std (the last one's is 0; "
                                                  "smaller makes δ of explored and backward "
                                                  "rows explode: see the module docstring)")
    guidance_scale: float = Field(1.0, ge=0, description="classifier-free guidance w (1: none; "
                                                         "the target is p_prior · r^β)")
    reference_renders: int = Field(256, ge=8, le=10_000, description="renders per prompt that "
                                                                     "Fréchet distance and "
                                                                     "diversity compare against")
    unet: UNetConfig = UNetConfig()
    text: TextConfig = TextConfig()
    pretrain: PretrainConfig = PretrainConfig()
    reward: RewardConfig = RewardConfig()

    @field_validator("rare_prompts")
    @classmethod
    def _captions(cls, v: list[str]) -> list[str]:
        ids = [prompt_id(c) for c in v]  # an unknown word or form: named
        if len(set(ids)) != len(ids):
            raise ValueError(f"a caption is listed twice: {v}")
        return v

    @model_validator(mode="after")
    def _sizes(self) -> "Config":
        if self.max_radius < self.min_radius:
            raise ValueError(f"max_radius ({self.max_radius}) is below min_radius "
                             f"({self.min_radius})")
        fits = (1 - 1 / self.size) / TRIANGLE_SIDE  # the widest shape, half a pixel each side
        if self.max_radius > fits:
            raise ValueError(f"max_radius: a triangle of radius {self.max_radius} × size does not "
                             f"fit in the image (at most {fits:.3f})")
        u = self.unet
        levels = len(u.block_out_channels)
        if self.size % 2 ** (levels - 1):
            raise ValueError(f"size ({self.size}) must be divisible by 2^{levels - 1} "
                             f"(unet.block_out_channels has {levels} levels)")
        for ch in u.block_out_channels:
            if ch % u.norm_num_groups:
                raise ValueError(f"unet.block_out_channels: {ch} is not a multiple of "
                                 f"unet.norm_num_groups ({u.norm_num_groups})")
        for ch in u.block_out_channels[1:] or u.block_out_channels:
            if ch % u.attention_heads:
                raise ValueError(f"unet.block_out_channels: {ch} is not a multiple of "
                                 f"unet.attention_heads ({u.attention_heads})")
        if self.text.hidden_size % self.text.heads:
            raise ValueError(f"text.hidden_size ({self.text.hidden_size}) is not a multiple of "
                             f"text.heads ({self.text.heads})")
        return self

    def rare_ids(self) -> list[int]:
        return sorted(prompt_id(c) for c in self.rare_prompts)

    def spec(self) -> dict:
        """Everything the checkpoint (prior, reward network, their stats) depends on; not
        ``guidance_scale`` or ``rare_weight``, which act at sampling time."""
        fields = {"size", "antialias", "min_radius", "max_radius", "rare_prompts",
                  "rare_fraction", "num_steps", "num_train_timesteps", "min_std", "unet", "text",
                  "pretrain", "reward"}
        return {"family": "ddim-eta1-trailing", "network": "eps = sqrt(1 - abar) x + unet",
                "prompts": list(PROMPTS), **self.model_dump(include=fields)}


# -- building blocks the task and its tests share ------------------------------------------------
def ddim_scheduler(config: Config) -> object:
    from diffusers import DDIMScheduler  # heavy; only where a family is built

    return DDIMScheduler(num_train_timesteps=config.num_train_timesteps, clip_sample=False,
                         timestep_spacing="trailing")


def new_unet(config: Config) -> nn.Module:
    """The UNet of ``config.unet`` (random init)."""
    from diffusers import UNet2DConditionModel

    u = config.unet
    levels = len(u.block_out_channels)
    return UNet2DConditionModel(
        sample_size=config.size, in_channels=3, out_channels=3,
        block_out_channels=tuple(u.block_out_channels), layers_per_block=u.layers_per_block,
        cross_attention_dim=config.text.hidden_size, attention_head_dim=u.attention_heads,
        norm_num_groups=u.norm_num_groups,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",))


def prompt_tokens() -> Tensor:
    """The 12 captions and, last, the empty prompt, ``[13, CAPTION_LENGTH]`` int64."""
    tok = Tokenizer()
    return torch.tensor([tok.encode(c) for c in (*PROMPTS, "")])


@torch.no_grad()
def prompt_states(text: TextConfig) -> Tensor:
    """The text encoder's last hidden states of ``prompt_tokens()``, ``[13, L, hidden]``."""
    tf = _transformers()
    cfg = tf.CLIPTextConfig(vocab_size=len(WORDS), hidden_size=text.hidden_size,
                            intermediate_size=text.intermediate_size,
                            num_hidden_layers=text.layers, num_attention_heads=text.heads,
                            max_position_embeddings=CAPTION_LENGTH, pad_token_id=PAD,
                            bos_token_id=BOS, eos_token_id=EOS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(text.seed)
        encoder = tf.CLIPTextModel(cfg).eval()
    tokens = prompt_tokens()
    return encoder(input_ids=tokens, attention_mask=(tokens != PAD).long()).last_hidden_state


def split_weights(config: Config) -> Tensor:
    """The training split's probability of each prompt (natural: uniform)."""
    w = torch.ones(NUM_PROMPTS, dtype=torch.float64)
    w[config.rare_ids()] = config.rare_fraction
    return w / w.sum()


def render_prompts(ids: Tensor, config: Config, generator: torch.Generator) -> Tensor:
    """One random render of each prompt id in ``ids [n]``."""
    scenes = draw_scenes(ids % len(SHAPES), ids // len(SHAPES), config.size,
                         (config.min_radius, config.max_radius), generator)
    return render(scenes, config.size, config.antialias)


@dataclass
class Pairs:
    """Preference pairs: renders ``a``, ``b`` for prompts ``ids``, and how many of each
    prompt's attributes (colour, shape) they match (0, 1 or 2)."""

    a: Tensor
    b: Tensor
    ids: Tensor
    matches_a: Tensor
    matches_b: Tensor


def preference_pairs(n: int, config: Config, generator: torch.Generator,
                     noisy: bool = True) -> Pairs:
    """``n`` pairs, prompts uniform (the natural distribution: the reward knows the rare pairs
    as well as any). Each render keeps the prompt's colour, and independently its shape, with
    probability ½, else draws another: 0, 1, 2 matches with probability ¼, ½, ¼."""
    ids = torch.randint(0, NUM_PROMPTS, (n,), generator=generator)
    c, s = ids // len(SHAPES), ids % len(SHAPES)

    def one() -> tuple[Tensor, Tensor]:
        keep = torch.rand(n, 2, generator=generator) < 0.5
        other_c = torch.randint(1, len(COLOURS), (n,), generator=generator)
        other_s = torch.randint(1, len(SHAPES), (n,), generator=generator)
        colour = torch.where(keep[:, 0], c, (c + other_c) % len(COLOURS))
        shape = torch.where(keep[:, 1], s, (s + other_s) % len(SHAPES))
        x = render(draw_scenes(shape, colour, config.size, (config.min_radius,
                                                            config.max_radius), generator),
                   config.size, config.antialias)
        if noisy and config.reward.noise_std > 0:
            std = config.reward.noise_std * torch.rand(n, 1, 1, 1, generator=generator)
            x = x + std * torch.randn(x.shape, generator=generator)
        return x, keep.sum(1)

    (a, ma), (b, mb) = one(), one()
    return Pairs(a, b, ids, ma, mb)


def train_reward(config: Config, progress: bool = True) -> tuple[RewardNet, list[float]]:
    """Bradley–Terry on soft labels: BCE(σ(s_a − s_b), σ(κ·(m_a − m_b))), so score
    differences converge to κ per attribute (calibrated, and bounded: hard labels would push
    them apart without limit). Then the per-prompt offset: renders of the prompt score 0."""
    r = config.reward
    torch.manual_seed(r.seed)
    net = RewardNet(r.width, r.features)
    gen = torch.Generator().manual_seed(r.seed)
    opt = torch.optim.Adam(net.parameters(), lr=r.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / r.steps, 1.0))))
    losses = []
    for step in progress_bar(range(r.steps), "train reward", progress):
        p = preference_pairs(r.batch_size, config, gen)
        scores = net(torch.cat([p.a, p.b]), torch.cat([p.ids, p.ids]))
        s_a, s_b = scores.chunk(2)
        target = torch.sigmoid(r.margin * (p.matches_a - p.matches_b).float())
        loss = F.binary_cross_entropy_with_logits(s_a - s_b, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == r.steps - 1:
            losses.append(loss.item())
    net.eval().requires_grad_(False)
    with torch.no_grad():  # renders of each prompt, clean: their mean score is the offset
        ids = torch.arange(NUM_PROMPTS).repeat_interleave(64)
        x = render_prompts(ids, config, torch.Generator().manual_seed(r.seed + 1))
        raw = net(x, ids)
        net.offset.copy_(torch.zeros(NUM_PROMPTS).index_add_(0, ids, raw) / 64)
    return net, losses


@torch.no_grad()
def reward_figures(net: RewardNet, config: Config, n: int = 4096, seed: int = 10_007
                   ) -> dict[str, float]:
    """On fresh pairs: ``reward_pair_accuracy`` (pairs that differ in matches, noisy as in
    training: the more matching render scores higher) and the reward's scale on clean renders:
    mean log r with 2, 1, 0 attributes matched (``reward_log_r_match{2,1,0}``)."""
    gen = torch.Generator().manual_seed(seed)
    p = preference_pairs(n, config, gen)
    s_a, s_b = net(p.a, p.ids), net(p.b, p.ids)
    differ = p.matches_a != p.matches_b
    right = (s_a > s_b) == (p.matches_a > p.matches_b)
    out = {"reward_pair_accuracy": right[differ].double().mean().item()}
    clean = preference_pairs(n, config, gen, noisy=False)
    log_r = torch.cat([net(clean.a, clean.ids), net(clean.b, clean.ids)])
    matches = torch.cat([clean.matches_a, clean.matches_b])
    for m in (2, 1, 0):
        out[f"reward_log_r_match{m}"] = log_r[matches == m].double().mean().item()
    out["reward_log_r_std_match2"] = log_r[matches == 2].double().std().item()
    return out


def mean_pairwise_distance(f: Tensor, max_rows: int = 1024) -> float:
    """Mean Euclidean distance between distinct rows (the first ``max_rows``)."""
    f = f[:max_rows].double()
    return torch.pdist(f).mean().item() if f.shape[0] > 1 else float("nan")


# -- the task ------------------------------------------------------------------------------------
class T2IShapesTask:
    name = "t2i_shapes"
    progress_metrics = ("oracle_accuracy_rare", "oracle_accuracy_common", "reward_rare",
                        "diversity_rare", "frechet_distance_rare")
    # closeness to renders of the prompt: reward alone would favour whatever the network is
    # surest of, on or off the image manifold
    baseline_metric = "frechet_distance"

    def __init__(self, config: Config) -> None:
        self.config = c = config
        self.num_prompts = NUM_PROMPTS
        self.event_shape = (3, c.size, c.size)
        self.family = DDIMGaussian.from_scheduler(ddim_scheduler(c), c.num_steps,
                                                  self.event_shape, c.min_std)
        self.rare_ids = c.rare_ids()
        self._models: tuple[PromptUNet, RewardNet] | None = None
        self._stats: dict | None = None
        self._references: dict[int, Tensor] = {}

    # -- conditions ------------------------------------------------------------------------------
    def ids_of(self, cond: Tensor) -> Tensor:
        """Prompt ids of ``cond`` (``[n]`` or ``[n, 1]``), refused in one line when one is not
        a prompt (the empty prompt, id 12, is the prior's null condition, not a prompt)."""
        ids = cond.long().reshape(-1)
        bad = ids[(ids < 0) | (ids >= NUM_PROMPTS)]
        if bad.numel():
            raise ValueError(f"t2i_shapes: prompt id {int(bad[0])} is not one of "
                             f"0..{NUM_PROMPTS - 1} (task.num_prompts)")
        return ids

    def conditions(self, n: int, generator: torch.Generator) -> Tensor:
        """Prompt ids ``[n, 1]``, the rare prompts at ``rare_weight`` × the others' weight.
        RTB's target is per prompt, so the weights only share the steps out: the prior is
        already close to its target on a common prompt (log r ≈ 0 on most of its samples),
        while on a rare one most of the work is to be done."""
        w = torch.ones(NUM_PROMPTS, dtype=torch.float64)
        w[self.rare_ids] = self.config.rare_weight
        return torch.multinomial(w, n, replacement=True, generator=generator)[:, None]

    def eval_conditions(self) -> Tensor:
        return torch.arange(NUM_PROMPTS)[:, None]

    def training_batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` renders of the colour-biased training split and their prompt ids ``[n, 1]``."""
        ids = torch.multinomial(split_weights(self.config), n, replacement=True,
                                generator=generator)
        return render_prompts(ids, self.config, generator), ids[:, None]

    # -- the prior and the reward network --------------------------------------------------------
    def new_prior_network(self, states: Tensor | None = None) -> PromptUNet:
        c = self.config
        if states is None:  # a placeholder, for a state dict to fill
            states = torch.zeros(NUM_PROMPTS + 1, CAPTION_LENGTH, c.text.hidden_size)
        unet = SkipUNet(new_unet(c), ddim_scheduler(c).alphas_cumprod)
        return PromptUNet(unet, states, c.guidance_scale)

    def new_reward_network(self) -> RewardNet:
        return RewardNet(self.config.reward.width, self.config.reward.features)

    def _bundle(self) -> nn.ModuleDict:
        return nn.ModuleDict({"prior": self.new_prior_network(),
                              "reward": self.new_reward_network()})

    def prior_path(self) -> Path:
        return self.config.prior_path()

    def _load(self) -> tuple[PromptUNet, RewardNet]:
        if self._models is None:
            bundle, self._stats = load_frozen_bundle(self.config, self.name, self.pretrain,
                                                     self._bundle(), self._check_unet)
            self._models = (bundle["prior"], bundle["reward"])
        return self._models

    def _check_unet(self, path: Path) -> None:
        """A prior with another UNet is refused in one line naming what differs (its weights
        do not fit this network), before the rest of its spec is compared."""
        ckpt = read_checkpoint(path, "an rtb-ray prior checkpoint")
        spec = ckpt.get("spec") if isinstance(ckpt, dict) else None
        theirs = spec.get("unet") if isinstance(spec, dict) else None
        ours = self.config.unet.model_dump()
        if isinstance(theirs, dict) and theirs != ours:
            diff = ", ".join(f"{k} {theirs.get(k)} (task.unet.{k}: {v})" for k, v in ours.items()
                             if theirs.get(k) != v)
            raise ValueError(f"prior_checkpoint {path}: a UNet with {diff} (refused)")

    def prior(self) -> PromptUNet:
        return self._load()[0]

    def reward_network(self) -> RewardNet:
        return self._load()[1]

    @property
    def stats(self) -> dict:
        if self._stats is None:
            self._load()
        assert self._stats is not None
        return self._stats

    def pretrain(self, progress: bool = True) -> dict:
        """The reward network (preference pairs), then the prior (ε-matching on the training
        split, ``cond_drop`` rows on the empty prompt), then the prior's figures per prompt from
        ``stats_samples`` samples each; saves all in one checkpoint."""
        c, cfg = self.config, self.config.pretrain
        start = time.perf_counter()
        reward, reward_losses = train_reward(c, progress)
        reward_s = time.perf_counter() - start
        states = prompt_states(c.text)
        torch.manual_seed(cfg.seed)
        prior = self.new_prior_network(states)
        prior_start = time.perf_counter()
        losses = pretrain_prior(self.family, prior, self.training_batch, steps=cfg.steps,
                                batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                                progress=progress, cond_drop=cfg.cond_drop,
                                null_cond=torch.tensor([NUM_PROMPTS]))
        prior_s = time.perf_counter() - prior_start
        prior.eval().requires_grad_(False)
        stats: dict = {"rare_prompts": [PROMPTS[k] for k in self.rare_ids],
                       "reward_seconds": reward_s, "reward_last_loss": reward_losses[-1],
                       "prior_seconds": prior_s, "prior_step_seconds": prior_s / cfg.steps,
                       "prior_last_loss": losses[-1],
                       "unet_parameters": float(sum(p.numel() for p in prior.unet.parameters())),
                       "reward_parameters": float(sum(p.numel() for p in reward.parameters())),
                       **reward_figures(reward, c), **self._prior_figures(prior, reward)}
        stats["pretrain_seconds"] = time.perf_counter() - start
        bundle = nn.ModuleDict({"prior": prior, "reward": reward})
        save_prior(c.prior_path(), self.name, c.spec(), bundle, stats)
        self._models, self._stats = None, None  # loaded afresh, as any later process would
        return stats

    @torch.no_grad()
    def _prior_figures(self, prior: PromptUNet, reward: RewardNet) -> dict:
        """The prior's oracle accuracy and mean log r per prompt (lists) and over the rare
        and the common prompts."""
        n = self.config.pretrain.stats_samples
        gen = torch.Generator().manual_seed(self.config.pretrain.seed + 1)
        ids = torch.arange(NUM_PROMPTS).repeat_interleave(n)
        x = torch.cat([self.family.sample(prior, chunk.shape[0], cond=chunk[:, None],
                                          generator=gen)[0][:, -1]
                       for chunk in ids.split(1024)])
        colour, shape = self.oracle(x)
        correct = ((colour == ids // 3) & (shape == ids % 3)).double().view(NUM_PROMPTS, n)
        log_r = reward(x, ids).double().view(NUM_PROMPTS, n)
        accuracy, mean_r = correct.mean(1).tolist(), log_r.mean(1).tolist()
        return {"prior_oracle_accuracy": accuracy, "prior_reward": mean_r,
                **self._rare_common("prior_oracle_accuracy", accuracy),
                **self._rare_common("prior_reward", mean_r)}

    def _rare_common(self, key: str, per_prompt: list[float]) -> dict[str, float]:
        """``key_rare`` and ``key_common``: the means of a per-prompt list over the rare and the
        other prompts (NaN entries, prompts not evaluated, left out)."""
        out = {}
        for part, ids in (("rare", self.rare_ids),
                          ("common", [k for k in range(NUM_PROMPTS) if k not in self.rare_ids])):
            values = [per_prompt[k] for k in ids if not math.isnan(per_prompt[k])]
            if values:
                out[f"{key}_{part}"] = sum(values) / len(values)
        return out

    # -- reward and oracle -----------------------------------------------------------------------
    def log_reward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """log r(x, prompt) = the reward network's score (≈ −κ per attribute missed; 0 on
        average on renders of the prompt). Differentiable in x (guidance baselines)."""
        if cond is None:
            raise ValueError("t2i_shapes is conditional: log_reward needs cond (prompt ids)")
        ids = self.ids_of(cond).to(x.device)
        net = self.reward_network()
        if net.offset.device != x.device:
            net.to(x.device)
        return net(x.float(), ids)

    def oracle(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Each image's colour and shape id by the renderer's rules (−1: none)."""
        c = self.config
        return oracle(x, c.size, c.min_radius, c.max_radius)

    def reference_log_z(self, beta: float = 1.0, cond: Tensor | None = None) -> None:
        """Unknown: Z(c) integrates r^β over the learned prior."""
        return None

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def reference_features(self, k: int) -> Tensor:
        """The reward network's features of ``reference_renders`` renders of prompt ``k``
        (fixed seed: the same set for every evaluation and every method)."""
        if k not in self._references:
            n = self.config.reference_renders
            gen = torch.Generator().manual_seed(20_011 + k)
            x = render_prompts(torch.full((n,), k), self.config, gen)
            self._references[k] = self.reward_network().cpu().features(x)
        return self._references[k]

    @torch.no_grad()
    def evaluate(self, x: Tensor, cond: Tensor | None = None,
                 ctx: EvalContext | None = None) -> dict[str, float]:
        """Per prompt (``<metric>_<colour>_<shape>``), and as means over all prompts (the
        metric's own name), the rare ones (``_rare``) and the others (``_common``):
        ``reward`` (mean log r), ``oracle_accuracy``, ``diversity`` (mean pairwise distance
        of the samples in the reward network's features, over that of renders of the prompt:
        ~1 is as diverse as the data), ``frechet_distance`` (in those features, to renders of
        the prompt). Also ``reward_std`` (within-prompt std of log r, mean over prompts),
        ``colour_accuracy``, ``shape_accuracy`` and the prior's oracle accuracy
        (``prior_oracle_accuracy_{rare,common}``, stored at pretraining) to read gains by."""
        if cond is None:
            raise ValueError("t2i_shapes is conditional: evaluate needs cond (prompt ids)")
        ids = self.ids_of(cond).cpu()
        x = x.float().cpu()
        net = self.reward_network().cpu()
        log_r = net(x, ids).double()
        features = net.features(x)
        colour, shape = self.oracle(x)
        colour_ok, shape_ok = colour == ids // 3, shape == ids % 3
        per: dict[str, list[float]] = {k: [math.nan] * NUM_PROMPTS for k in (
            "reward", "oracle_accuracy", "diversity", "frechet_distance", "reward_std")}
        for k in ids.unique().tolist():
            rows = ids == k
            ref = self.reference_features(k)
            per["reward"][k] = log_r[rows].mean().item()
            per["reward_std"][k] = log_r[rows].std().item() if rows.sum() > 1 else math.nan
            per["oracle_accuracy"][k] = (colour_ok & shape_ok)[rows].double().mean().item()
            per["diversity"][k] = mean_pairwise_distance(features[rows]) / \
                mean_pairwise_distance(ref)
            per["frechet_distance"][k] = frechet_distance(features[rows], ref) \
                if rows.sum() > 1 else math.nan
        out: dict[str, float] = {}
        for key, values in per.items():
            present = [v for v in values if not math.isnan(v)]
            if not present:
                continue
            out[key] = sum(present) / len(present)
            if key != "reward_std":
                out.update(self._rare_common(key, values))
                out.update({f"{key}_{prompt_key(k)}": v for k, v in enumerate(values)
                            if not math.isnan(v)})
        out["colour_accuracy"] = colour_ok.double().mean().item()
        out["shape_accuracy"] = shape_ok.double().mean().item()
        for key in ("prior_oracle_accuracy_rare", "prior_oracle_accuracy_common"):
            if key in self.stats:
                out[key] = float(self.stats[key])
        return out

    def plot(self, x: Tensor, path: Path, title: str = "", cond: Tensor | None = None) -> None:
        """A grid: one row per prompt (rare ones starred) of up to 12 samples, each framed by
        the oracle's verdict (green: colour and shape both match the prompt, red: not)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if cond is None:
            raise ValueError("t2i_shapes is conditional: plot needs cond (prompt ids)")
        ids = self.ids_of(cond).cpu()
        x = x.float().cpu()
        prompts = ids.unique().tolist()
        per_row = 12
        s = self.config.size
        colour, shape = self.oracle(x)
        fig, axes = plt.subplots(len(prompts), per_row, squeeze=False, dpi=100,
                                 figsize=(0.75 * per_row + 1.6, 0.8 * len(prompts) + 0.5))
        for row, k in enumerate(prompts):
            at = (ids == k).nonzero()[:, 0][:per_row]
            for col in range(per_row):
                ax = axes[row][col]
                ax.set_xticks([])
                ax.set_yticks([])
                if col >= at.numel():
                    ax.set_axis_off()
                    continue
                i = int(at[col])
                ax.imshow(((x[i].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(),
                          interpolation="nearest", extent=(0, s, s, 0))
                ok = int(colour[i]) == k // 3 and int(shape[i]) == k % 3
                for side in ax.spines.values():
                    side.set_color("tab:green" if ok else "tab:red")
                    side.set_linewidth(1.5)
            star = " *" if k in self.rare_ids else ""
            axes[row][0].set_ylabel(f"{PROMPTS[k][2:]}{star}", rotation=0, ha="right",
                                    va="center", fontsize=8)
        fig.suptitle(f"{title}  (* rare in the prior's data; frame: oracle green = match)",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def make_task(config: Config) -> T2IShapesTask:
    return T2IShapesTask(config)
