"""Shared fixtures: a Gaussian task whose posterior and normaliser are known in closed form."""

from __future__ import annotations

import math
from pathlib import Path

# Ray's token authentication and single-node mode for this process, which starts local Rays
# and joins the runs the tests start; Ray reads both on import, before any test imports it.
# The CLI under test sets them itself: its subprocesses get a user's environment (test_cli.py).
from actors.session import prepare_ray

SET_FOR_THE_SUITE = prepare_ray(None)

from typing import Iterator

import pytest
import torch
from torch import Tensor

from rtb_ray.networks import TimeMLP
from rtb_ray.transitions import PinnedBrownian


class GaussianTask:
    """Zero-drift pinned Brownian prior (x_1 ~ N(0, σ² I)) and a Gaussian likelihood reward
    r(x) = N(y; x, s² I). Posterior N(m, v I) with v = 1/(1/σ² + 1/s²), m = v·y/s²;
    log Z = log N(y; 0, (σ² + s²) I)."""

    name = "gaussian"

    def __init__(self, dim: int = 1, num_steps: int = 50, sigma: float = 1.0, s2: float = 1.0,
                 y: float = 1.5, hidden: int = 32) -> None:
        # learned variance: the reward-tilted Brownian motion is then exactly in the family
        self.family = PinnedBrownian(dim, num_steps, sigma, learn_variance=True)
        self.dim, self.sigma2, self.s2 = dim, sigma**2, s2
        self.y = torch.full((dim,), y)
        self.hidden = hidden
        self.post_var = 1 / (1 / self.sigma2 + 1 / s2)
        self.post_mean = self.post_var * self.y / s2
        total = self.sigma2 + s2
        self.log_z = float(
            -0.5 * (self.y.square().sum() / total + dim * math.log(2 * math.pi * total))
        )

    def prior(self) -> TimeMLP:
        net = TimeMLP(self.dim, self.family.num_steps, hidden=self.hidden, depth=1,
                      time_features=16, out_dim=self.family.net_out_dim)
        return net.requires_grad_(False)  # zero last layer: exactly the zero drift

    def log_reward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return -0.5 * ((x - self.y).square().sum(-1) / self.s2
                       + self.dim * math.log(2 * math.pi * self.s2))

    def conditions(self, n: int) -> None:
        return None

    def sample_posterior(self, n: int, gen: torch.Generator) -> Tensor:
        return self.post_mean + math.sqrt(self.post_var) * torch.randn(n, self.dim, generator=gen)


REPO = Path(__file__).resolve().parent.parent
# MLflow's default store, where runs go without --tracking-uri or MLFLOW_TRACKING_URI
REPO_STORE = (REPO / "mlflow.db", REPO / "mlartifacts")


def _stamp(paths: tuple[Path, ...]) -> list[int | None]:
    return [p.stat().st_mtime_ns if p.exists() else None for p in paths]


@pytest.fixture(autouse=True, scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Every MLflow run of the suite goes to one store in the session's temporary folder: never
    to ./mlflow.db of the directory the CLI runs in (the repository: test_cli.py runs it there)
    nor to a store the user's own MLFLOW_* variables name. It is set in the environment, so
    the CLI under test inherits it (``user_env`` keeps it): that of a user who has set
    MLFLOW_TRACKING_URI, as MLflow suggests. Tests of the default store unset it and run the
    CLI in a directory of their own. Afterwards: the repository's store was not touched."""
    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    before = _stamp(REPO_STORE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
        for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_REGISTRY_URI"):
            mp.delenv(name, raising=False)
        yield f"sqlite:///{store}"
    assert _stamp(REPO_STORE) == before, f"a test wrote MLflow runs into {REPO}"


@pytest.fixture
def gaussian_task() -> GaussianTask:
    torch.manual_seed(0)
    return GaussianTask()


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty prior cache, so tests never reuse (or pollute) the user's cached priors."""
    monkeypatch.setenv("RTB_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prior cache holding the tiny config's pretrained prior (made once per test session)."""
    from test_cli import TINY, rtb_ray, sets

    cache = tmp_path_factory.mktemp("cache")
    out = rtb_ray("pretrain", "gmm25", *sets(TINY), cache=cache, check=True).stdout
    assert "prior saved to" in out and "prior_tv_uniform" in out
    assert len(list((cache / "gmm25").glob("prior-*.pt"))) == 1
    again = rtb_ray("pretrain", "gmm25", *sets(TINY), cache=cache, check=True).stdout
    assert "already cached" in again
    return cache


@pytest.fixture
def one_thread():
    """A training run may share these cores: one torch thread, restored afterwards (a test
    module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
