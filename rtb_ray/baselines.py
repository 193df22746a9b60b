"""Training-free baselines, evaluated by the same task code as RTB posteriors.

Classifier guidance with DPS's gradient (RTB.md, "Baselines"): sample the frozen prior with each
reverse mean moved by ``λ · std_t · g / rms(g)``, g = ∇_{x_t} log r(x̂_0(x_t)), where x̂_0 is
Tweedie's estimate of the clean image (λ = 1: one std per step along the reward's gradient).
λ is searched over a grid; every scale's samples get the task's evaluation, and the best scale
is the one with the lowest ``task.baseline_metric`` (for digits the Fréchet distance to real
images of the allowed classes). The other baseline, KL-regularised policy gradient, is an
objective of the trainer (``train.objective.kind=kl_rl``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from rtb_ray.config import RunConfig, config_to_dict
from rtb_ray.tasks import Task, conditional
from rtb_ray.run_dir import write_json
from rtb_ray.tracking import TrackingRequest, open_run_tracker
from rtb_ray.transitions import GuidedFamily


def guidance_sweep(cfg: RunConfig, task: Task, output: Path, scales: list[float], n: int,
                   tracking: TrackingRequest | None = None, chunk: int = 1000) -> dict:
    """Evaluate guided prior samples of ``task`` (made from ``cfg.task``) at every scale; writes
    ``output/guidance_eval.json`` (every scale, and the best by ``task.baseline_metric``) and a
    sample grid per scale, also to an MLflow run (tagged ``method=guidance``) where
    ``tracking`` says (default: this process's command line environment)."""
    family = task.family
    if not isinstance(family, GuidedFamily):
        raise ValueError(f"guidance needs a family with an x̂_0 estimate (a GuidedFamily, e.g. "
                         f"a DDPM); task {task.name!r} has a {type(family).__name__}")
    if conditional(task):  # one guided sample per condition needs a per-condition reward
        raise ValueError(f"guidance evaluates unconditional tasks; task {task.name!r} is "
                         f"conditional")
    prior = task.prior()
    output = Path(output)
    if (output / "guidance_eval.json").exists():
        raise FileExistsError(f"{output} already holds a guidance sweep")
    (output / "eval").mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tracker = (open_run_tracker(output, cfg, task.name, resume=False, request=tracking,
                                method="guidance")
               if cfg.tracking.enabled else None)
    status = "FAILED"
    try:
        if tracker is not None:
            tracker.set_tags({"baseline": "guidance"})
        rows = []
        for i, scale in enumerate(tqdm(scales, desc="guidance scales")):
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg.seeds.guidance)
            x = torch.cat([family.sample(prior, min(chunk, n - j), generator=gen,
                                         guidance=task.log_reward, guidance_scale=scale)[0][:, -1]
                           for j in range(0, n, chunk)])
            with torch.no_grad():
                row = {"guidance_scale": scale,
                       "mean_log_reward": task.log_reward(x).double().mean().item(),
                       **task.evaluate(x), "num_samples": n,
                       "seconds": time.perf_counter() - t0}
            png = output / "eval" / f"guidance_scale_{scale:g}.png"
            task.plot(x, png, title=f"guidance scale {scale:g}")
            rows.append(row)
            if tracker is not None:
                tracker.log_metrics({f"eval/{k}": v for k, v in row.items()}, step=i)
                tracker.log_artifact(png, "eval")
        result = {"scales": rows, "best_by": task.baseline_metric,
                  "best": min(rows, key=lambda r: r[task.baseline_metric])}
        write_json(output / "guidance_eval.json", result)
        if tracker is not None:
            tracker.log_artifact(output / "guidance_eval.json")
        status = "FINISHED"
        return result
    finally:
        if tracker is not None:
            tracker.close(status)
