"""The peer: torchgfn 2.4.1's RTB on its 25→9 target, with its example's defaults.

Runs in the peer's own virtual environment (``benchmarks/run.py --peer`` makes it; torchgfn pins
numpy < 2) and imports nothing of rtb-ray. It writes terminal samples at regular points of its
fine-tuning, with wall times, to ``OUT/peer_curve.npz``; ``benchmarks/run.py`` scores them with
rtb-ray's metrics, so every system is judged by the same code on the same number of samples.

    python benchmarks/peer_torchgfn.py --out DIR [--pretrain-steps 10000] [--iterations 5000]

The defaults are those of torchgfn's ``tutorials/examples/train_diffusion_rtb.py``: a
``DiffusionPISGradNetForward`` (64-wide embeddings, 2 joint layers, zero-initialised last
layer, fixed variance, t_scale 5) in a ``PinnedBrownianMotionForward`` (σ = 2, T = 100);
prior pretrained by backward maximum likelihood on ``gmm25_prior`` samples (10 000 Adam steps
of 500, lr 1e-3); then ``RelativeTrajectoryBalanceGFlowNet`` (β = 1, log Z from 0) for 5 000
iterations of 500 on-policy trajectories with exploration noise 0.5 warmed down linearly to 0
at iteration 4 500, Adam lr 1e-3, log Z lr 0.1.

The pretraining loss is written here (the example defines it in the script, not in the
library): the negative forward log-likelihood of Brownian-bridge paths from 0 to each data
point, the bridge's noise scale being the forward kernel's own (σ·√(dt·t_scale)); the
example's learned backward corrections are off by default and so are absent here. Evaluation
sampling is excluded from the reported wall times (in the peer's favour).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from gfn.estimators import PinnedBrownianMotionForward
from gfn.gflownet import RelativeTrajectoryBalanceGFlowNet
from gfn.gym.diffusion_sampling import DiffusionSampling
from gfn.samplers import Sampler
from gfn.utils.modules import DiffusionPISGradNetForward

SIGMA, T_SCALE, NUM_STEPS = 2.0, 5.0, 100


def forward_policy(dim: int) -> PinnedBrownianMotionForward:
    net = DiffusionPISGradNetForward(s_dim=dim, harmonics_dim=64, t_emb_dim=64, s_emb_dim=64,
                                     hidden_dim=64, joint_layers=2, zero_init=True,
                                     clipping=False, gfn_clip=1e4, t_scale=T_SCALE,
                                     log_var_range=4.0, learn_variance=False)
    return PinnedBrownianMotionForward(s_dim=dim, pf_module=net, sigma=SIGMA,
                                       num_discretization_steps=NUM_STEPS, n_variance_outputs=0)


def bridge_nll(pf: PinnedBrownianMotionForward, x1: torch.Tensor) -> torch.Tensor:
    """−E log p_f(path) for Brownian-bridge paths pinned at 0 (t = 0) and x1 (t = 1)."""
    b, dim = x1.shape
    dt = 1.0 / NUM_STEPS
    std = SIGMA * math.sqrt(dt * T_SCALE)  # the forward kernel's std (fixed variance)
    x, total = x1, torch.zeros(b)
    for k in range(NUM_STEPS, 0, -1):  # x at time t = k·dt → x at t − dt
        t = k * dt
        if k > 1:
            mean = x * (t - dt) / t
            x_prev = mean + std * math.sqrt((t - dt) / t) * torch.randn_like(x)
        else:
            x_prev = torch.zeros_like(x)
        drift = pf.module(torch.cat([x_prev, torch.full((b, 1), t - dt)], dim=1))
        z = (x - x_prev - dt * drift) / std
        total = total - 0.5 * (z.square().sum(1) + dim * math.log(2 * math.pi * std ** 2))
        x = x_prev
    return -total.mean()


def exploration_std(iteration: int) -> float:
    return 0.5 * max(0.0, 1.0 - iteration / 4500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pretrain-steps", type=int, default=10_000)
    parser.add_argument("--iterations", type=int, default=5_000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-n", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "peer_log.jsonl", "a")

    def note(**row) -> None:
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(json.dumps(row), flush=True)

    env = DiffusionSampling("gmm25_posterior9", None, NUM_STEPS)
    prior_env = DiffusionSampling("gmm25_prior", None, NUM_STEPS)
    dim = env.dim

    # 1. prior pretraining (the peer's recipe), timed on its own
    pf_prior = forward_policy(dim)
    optimizer = torch.optim.Adam(pf_prior.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for step in range(args.pretrain_steps):
        with torch.no_grad():
            data = prior_env.target.sample(500)
        optimizer.zero_grad()
        loss = bridge_nll(pf_prior, data)
        loss.backward()
        optimizer.step()
        if (step + 1) % 500 == 0:
            note(phase="pretrain", step=step + 1, loss=loss.item(),
                 wall_s=time.perf_counter() - t0)
    prior_s = time.perf_counter() - t0

    # 2. RTB fine-tuning
    pf_post = forward_policy(dim)
    pf_post.load_state_dict(pf_prior.state_dict())
    for p in pf_prior.parameters():
        p.requires_grad_(False)
    gflownet = RelativeTrajectoryBalanceGFlowNet(pf=pf_post, prior_pf=pf_prior, init_logZ=0.0,
                                                 beta=1.0)
    sampler = Sampler(estimator=pf_post)
    optimizer = torch.optim.Adam([{"params": gflownet.pf.parameters(), "lr": 1e-3},
                                  {"params": gflownet.logz_parameters(), "lr": 0.1}], lr=1e-3)
    checkpoints: dict[str, np.ndarray] = {}
    rows = []

    def evaluate(iteration: int, train_s: float) -> None:
        with torch.no_grad():
            x = gflownet.sample_terminating_states(env, n=args.eval_n).tensor[:, :-1]
        checkpoints[f"x_{iteration}"] = x.numpy().astype(np.float32)
        rows.append({"iteration": iteration, "finetune_s": train_s, "prior_s": prior_s,
                     "log_z": float(gflownet.logZ.item())})
        note(phase="eval", **rows[-1])

    train_s = 0.0
    evaluate(0, 0.0)
    for it in range(args.iterations):
        t0 = time.perf_counter()
        trajectories = sampler.sample_trajectories(
            env, n=500, save_logprobs=False, save_estimator_outputs=False,
            exploration_std=torch.tensor(exploration_std(it)))
        optimizer.zero_grad()
        loss = gflownet.loss(env, trajectories, recalculate_all_logprobs=True)
        loss.backward()
        optimizer.step()
        train_s += time.perf_counter() - t0
        if (it + 1) % args.eval_every == 0 or it + 1 == args.iterations:
            evaluate(it + 1, train_s)

    tmp = args.out / "peer_curve.tmp.npz"
    np.savez(tmp, **checkpoints, meta=np.frombuffer(json.dumps({
        "rows": rows, "prior_s": prior_s, "finetune_s": train_s,
        "pretrain_steps": args.pretrain_steps, "iterations": args.iterations,
        "eval_n": args.eval_n, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads()}).encode(), np.uint8))
    os.replace(tmp, args.out / "peer_curve.npz")


if __name__ == "__main__":
    main()
