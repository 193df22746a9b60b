"""Vision: classifier-guided image posteriors (RTB.md, "Reference experiments").

Prior: an ε-prediction DDPM over images (sklearn's 8×8 digits by default; MNIST or CIFAR-10 from
local files), flattened to vectors. Reward: ``log r(x) = log max_{c ∈ allowed} p(c|x)`` (or
``log Σ_{c ∈ allowed} p(c|x)``) under a small CNN classifier. The target is
``p_prior(x)·r(x)^β``; its class proportions under an *independent* classifier (an MLP) are the
prior's proportions restricted to the allowed classes, which evaluation compares against.

``rtb-ray pretrain digits`` trains, in one checkpoint: the two classifiers, the DDPM, and
statistics of prior samples (reward-classifier log-probabilities, independent-classifier labels)
from which every reward setting's log Z, prior E[log r] and class proportions follow.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from rtb_ray.datasets import load_images
from rtb_ray.metrics import frechet_distance, mean_pairwise_cosine_distance, total_variation
from rtb_ray.networks import TimeMLP
from rtb_ray.pretrain import (PriorCheckpointConfig, load_or_pretrain, pretrain_prior,
                              progress_bar, save_prior)
from rtb_ray.transitions import DDPMGaussian

NUM_CLASSES = 10


class ClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    noise_std: float = Field(0.2, ge=0, description="Gaussian noise added to training images")


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(20_000, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0
    stats_samples: int = Field(10_000, ge=100, description="prior samples for target statistics")
    classifier: ClassifierConfig = ClassifierConfig()


class Config(PriorCheckpointConfig):
    """Settings of the image task (the ``task:`` section of a run config)."""

    name: Literal["digits"] = "digits"
    dataset: Literal["digits", "mnist", "cifar10"] = "digits"
    data_root: str | None = Field(None, description="folder of the MNIST/CIFAR-10 files")
    allowed_classes: Literal["even", "odd"] | list[int] = Field(
        "even", description="the classes the posterior keeps: even, odd, or a list"
    )
    combine: Literal["max", "sum"] = Field(
        "max", description="log r = log max (or log Σ) of p(c|x) over the allowed classes"
    )
    num_steps: int = Field(20, ge=1, le=10_000, description="T, DDPM steps")
    min_std: float = Field(1e-3, gt=0, description="floor on each reverse step's std")
    hidden: int = Field(512, ge=1)
    depth: int = Field(3, ge=0)
    pretrain: PretrainConfig = PretrainConfig()

    @field_validator("allowed_classes")
    @classmethod
    def _classes(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, list):
            if not v or len(set(v)) != len(v) or not all(0 <= c < NUM_CLASSES for c in v):
                raise ValueError(f"must be distinct classes in 0..{NUM_CLASSES - 1} (got {v})")
        return v

    @model_validator(mode="after")
    def _data(self) -> "Config":
        if self.dataset != "digits" and not self.data_root:
            raise ValueError(f"data_root: the {self.dataset} files' folder is required")
        return self

    def allowed(self) -> list[int]:
        if self.allowed_classes == "even":
            return [0, 2, 4, 6, 8]
        if self.allowed_classes == "odd":
            return [1, 3, 5, 7, 9]
        return sorted(self.allowed_classes)

    def spec(self) -> dict:
        """Everything the prior checkpoint depends on (not the reward's classes)."""
        return {"family": "ddpm-linear", "dataset": self.dataset, "num_steps": self.num_steps,
                "min_std": self.min_std,
                "hidden": self.hidden, "depth": self.depth, "pretrain": self.pretrain.model_dump()}


class Classifier(nn.Module):
    """``cnn``: two 3×3 convolutions and a pooled linear head (the reward);
    ``mlp``: two hidden layers (the independent judge, whose hidden layer is also the fixed
    feature space of the Fréchet distance and of diversity)."""

    def __init__(self, kind: Literal["cnn", "mlp"], shape: tuple[int, int, int], width: int = 64):
        super().__init__()
        self.kind, self.shape = kind, shape
        c, h, w = shape
        if kind == "cnn":
            self.body = nn.Sequential(
                nn.Conv2d(c, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, padding=1),
                nn.GELU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, width),
                nn.GELU())
        else:
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 256), nn.GELU(),
                                      nn.Linear(256, width), nn.GELU())
        self.head = nn.Linear(width, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.reshape(-1, *self.shape))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_classifier(kind: Literal["cnn", "mlp"], images: Tensor, labels: Tensor,
                     cfg: ClassifierConfig, seed: int, progress: bool = True) -> Classifier:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Classifier(kind, tuple(images.shape[1:]))  # type: ignore[arg-type]
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    for _ in progress_bar(range(cfg.steps), f"classifier ({kind})", progress, leave=False):
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
        # noisy copies: the reward also sees imperfect samples, and must not be brittle on them
        x = images[idx] + cfg.noise_std * torch.randn(images[idx].shape, generator=gen)
        loss = nn.functional.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(net: Classifier, images: Tensor, labels: Tensor) -> float:
    return (net(images).argmax(1) == labels).double().mean().item()


class DigitsTask:
    name = "digits"
    progress_metrics = ("class_tv", "outside_share", "frechet_distance", "diversity")
    # closeness to real images of the allowed classes: E[log r] alone would pick guidance
    # scales that push samples off the image manifold, into images the classifier is sure of
    baseline_metric = "frechet_distance"

    def __init__(self, config: Config) -> None:
        self.config = config
        images, labels = load_images(config.dataset, config.data_root)
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels)
        self.shape = tuple(self.images.shape[1:])
        self.dim = math.prod(self.shape)
        self.family = DDPMGaussian(self.dim, config.num_steps, config.min_std)
        self.allowed = torch.tensor(config.allowed())
        self._stats: dict | None = None
        self.reward_net: Classifier | None = None
        self.judge: Classifier | None = None

    # -- the prior, the classifiers ------------------------------------------------------------
    def new_network(self) -> TimeMLP:
        return TimeMLP(dim=self.dim, num_steps=self.config.num_steps, hidden=self.config.hidden,
                       depth=self.config.depth)

    def prior_path(self) -> Path:
        return self.config.prior_path()

    def prior(self) -> TimeMLP:
        state, stats = load_or_pretrain(self.config, self.name, self.pretrain)
        self._load_classifiers(stats)
        self._stats = stats
        net = self.new_network()
        net.load_state_dict(state)
        return net.requires_grad_(False).eval()

    def _load_classifiers(self, stats: dict) -> None:
        self.reward_net = Classifier("cnn", self.shape)  # type: ignore[arg-type]
        self.reward_net.load_state_dict(stats["reward_classifier"])
        self.judge = Classifier("mlp", self.shape)  # type: ignore[arg-type]
        self.judge.load_state_dict(stats["judge_classifier"])
        for net in (self.reward_net, self.judge):
            net.eval().requires_grad_(False)

    def pretrain(self, progress: bool = True) -> dict:
        """The two classifiers (80 % of the images; accuracy on the other 20 %), the DDPM on
        all images, then the statistics of ``stats_samples`` prior samples."""
        cfg = self.config.pretrain
        start = time.perf_counter()
        order = torch.randperm(self.images.shape[0], generator=torch.Generator().manual_seed(0))
        split = int(0.8 * len(order))
        train, held_out = order[:split], order[split:]
        reward_net = train_classifier("cnn", self.images[train], self.labels[train],
                                      cfg.classifier, cfg.seed + 11, progress)
        judge = train_classifier("mlp", self.images[train], self.labels[train],
                                 cfg.classifier, cfg.seed + 23, progress)
        stats: dict = {
            "reward_classifier": reward_net.state_dict(),
            "judge_classifier": judge.state_dict(),
            "reward_classifier_accuracy": accuracy(reward_net, self.images[held_out],
                                                   self.labels[held_out]),
            "judge_accuracy": accuracy(judge, self.images[held_out], self.labels[held_out]),
        }
        torch.manual_seed(cfg.seed)
        net = self.new_network()
        data = self.images.reshape(-1, self.dim)
        pretrain_prior(
            self.family, net, lambda n, g: data[torch.randint(0, data.shape[0], (n,), generator=g)],
            steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
            progress=progress,
        )
        stats["pretrain_seconds"] = time.perf_counter() - start
        self._load_classifiers(stats)
        x = self._sample(net.eval(), cfg.stats_samples, cfg.seed + 1)
        assert self.reward_net is not None and self.judge is not None
        stats["prior_reward_log_probs"] = torch.log_softmax(self.reward_net(x), 1)
        stats["prior_judge_labels"] = self.judge(x).argmax(1)
        save_prior(self.config.prior_path(), self.name, self.config.spec(), net, stats)
        self._stats = stats
        return {k: v for k, v in stats.items() if isinstance(v, float)}

    @torch.no_grad()
    def _sample(self, net: nn.Module, n: int, seed: int, chunk: int = 2000) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([self.family.sample(net, min(chunk, n - i), generator=gen)[0][:, -1]
                          for i in range(0, n, chunk)])

    @property
    def stats(self) -> dict:
        if self._stats is None:
            self.prior()
        assert self._stats is not None
        return self._stats

    # -- reward --------------------------------------------------------------------------------
    def _combine(self, log_probs: Tensor) -> Tensor:
        allowed = log_probs[:, self.allowed.to(log_probs.device)]
        return allowed.amax(1) if self.config.combine == "max" else allowed.logsumexp(1)

    def log_reward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Differentiable in x (guidance uses its gradient)."""
        if self.reward_net is None:
            self.prior()
        assert self.reward_net is not None
        net = self.reward_net.to(x.device)
        return self._combine(torch.log_softmax(net(x), 1))

    def conditions(self, n: int) -> None:
        return None

    def reference_log_z(self, beta: float = 1.0) -> float:
        """log E_prior[r^β], from the prior samples drawn at pretraining."""
        log_r = self._combine(self.stats["prior_reward_log_probs"]).double()
        return (torch.logsumexp(beta * log_r, 0) - math.log(log_r.shape[0])).item()

    # -- evaluation ----------------------------------------------------------------------------
    def class_shares(self, labels: Tensor) -> Tensor:
        return torch.bincount(labels, minlength=NUM_CLASSES).double() / labels.shape[0]

    def target_class_shares(self) -> Tensor:
        """The prior's class proportions (independent classifier) within the allowed classes."""
        shares = torch.zeros(NUM_CLASSES, dtype=torch.float64)
        prior = self.class_shares(self.stats["prior_judge_labels"])
        shares[self.allowed] = prior[self.allowed] / prior[self.allowed].sum()
        return shares

    @torch.no_grad()
    def evaluate(self, x: Tensor) -> dict[str, float]:
        if self.judge is None:
            self.prior()
        assert self.judge is not None
        x = x.float().cpu()
        labels = self.judge(x).argmax(1)
        shares = self.class_shares(labels)
        inside = shares[self.allowed].sum().item()
        within = torch.zeros_like(shares)
        if inside > 0:
            within[self.allowed] = shares[self.allowed] / inside
        target = self.target_class_shares()
        real = self.images[torch.isin(self.labels, self.allowed)]
        features = self.judge.features(x)
        gen = torch.Generator().manual_seed(0)
        out = {
            "class_tv": total_variation(within, target),
            "outside_share": 1.0 - inside,
            "allowed_classes_present": float(
                (shares[self.allowed] >= 0.25 * target[self.allowed] * inside).sum().item()),
            "frechet_distance": frechet_distance(features, self.judge.features(real)),
            "diversity": mean_pairwise_cosine_distance(features, generator=gen),
            "prior_mean_log_reward": self._combine(
                self.stats["prior_reward_log_probs"]).double().mean().item(),
        }
        out.update({f"class_share_{c}": shares[c].item() for c in range(NUM_CLASSES)})
        return out

    def plot(self, x: Tensor, path: Path, title: str = "") -> None:
        """A 10×10 grid of samples."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        c, h, w = self.shape
        n = min(100, x.shape[0])
        rows = math.ceil(n / 10)
        grid = torch.full((rows * (h + 1), 10 * (w + 1), c), 0.5)
        images = ((x[:n].reshape(n, c, h, w).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
        for i in range(n):
            r, q = divmod(i, 10)
            grid[r * (h + 1): r * (h + 1) + h, q * (w + 1): q * (w + 1) + w] = images[i]
        fig, ax = plt.subplots(figsize=(5, 5 * rows / 10 + 0.4), dpi=100)
        ax.imshow(grid.squeeze(-1).numpy(), cmap="gray_r" if c == 1 else None,
                  interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def make_task(config: Config) -> DigitsTask:
    return DigitsTask(config)
