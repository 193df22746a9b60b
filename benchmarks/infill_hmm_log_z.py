"""How well can an MLP of the context learn log Z(c) of infill_hmm from N training contexts?

Regresses the exact log Z(c) (``task.reference_log_z``: the shipped HMM and its cached prior) of
N = 256, 512, 1024 contexts with MLPs of the one-hot context, as ``train.log_z: {kind: mlp}``
reads it, and scores them on the 16 evaluation contexts and on 200 other held-out ones. RTB's
log Z(c) learns from noisy targets of the same function, so these are floors for its error on
held-out contexts. Prints and writes ``benchmarks/results/infill_hmm_log_z_regression.json``.

    python benchmarks/infill_hmm_log_z.py      # ~5 min on 2 cores (exact log Z of ~1500 contexts)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.infill_hmm import InfillHMMTask
from rtb_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def fit(x: torch.Tensor, y: torch.Tensor, hidden: int, depth: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = x.shape[1]
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    net = nn.Sequential(*layers, nn.Linear(width, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3000):  # full batch: the fit is not the question, generalisation is
        loss = (net(x)[:, 0] - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def main() -> None:
    task = InfillHMMTask(load_config(ROOT / "pipelines/configs/infill_hmm.yaml",
                                     ["task.num_train_contexts=1024"]).task)
    seen = {tuple(r) for r in torch.cat([task.train_contexts, task.eval_contexts]).tolist()}
    held = task._draw_contexts(200, seen, torch.Generator().manual_seed(99))
    sets = {"train": task.train_contexts, "eval16": task.eval_contexts, "heldout200": held}
    log_z = {k: task.reference_log_z(1.0, task.encode(v)).float() for k, v in sets.items()}
    feats = {k: F.one_hot(v, task.config.vocab_size).float().flatten(1) for k, v in sets.items()}
    rows = []
    for n in (256, 512, 1024):
        for hidden, depth in ((16, 1), (32, 2), (64, 2)):
            errors: dict[str, list[torch.Tensor]] = {"eval16": [], "heldout200": []}
            for seed in range(3):
                net = fit(feats["train"][:n], log_z["train"][:n], hidden, depth, seed)
                with torch.no_grad():
                    for k in errors:
                        errors[k].append((net(feats[k])[:, 0] - log_z[k]).abs())
            row = {"train_contexts": n, "mlp": f"{hidden}x{depth}"}
            for k, e in errors.items():  # means over the 3 seeds
                row[f"{k}_mean"] = round(sum(x.mean().item() for x in e) / 3, 4)
                row[f"{k}_max"] = round(sum(x.max().item() for x in e) / 3, 4)
            print(row, flush=True)
            rows.append(row)
    out = ROOT / "benchmarks/results/infill_hmm_log_z_regression.json"
    out.write_text(json.dumps({"what": __doc__.splitlines()[0], "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
