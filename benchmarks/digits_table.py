"""The even-digit comparison table: RTB (with and without the mass-covering term), classifier
guidance (best scale) and KL-RL, each run through the same pipeline and evaluated by the same
task code.

    rtb-ray train pipelines/configs/digits_even.yaml --output runs/digits-even
    rtb-ray train pipelines/configs/digits_even.yaml --output runs/digits-even-rtb \
        --set train.mass_covering.weight=0 --set train.mass_covering.warm_start_steps=0
    rtb-ray train pipelines/configs/digits_even.yaml --output runs/digits-even-klrl \\
        --set train.objective.kind=kl_rl --set 'train.sources={posterior: 1}'
    rtb-ray guidance pipelines/configs/digits_even.yaml --output runs/digits-even-guidance
    python benchmarks/digits_table.py --rtb runs/digits-even --kl-rl runs/digits-even-klrl \\
        --guidance runs/digits-even-guidance --rtb-only runs/digits-even-rtb

Prints a Markdown table and writes it with the numbers to ``--out`` (JSON and .md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

COLUMNS = [("mean_log_reward", "E[log r]"), ("class_tv", "class TV"),
           ("outside_share", "odd share"), ("frechet_distance", "Fréchet"),
           ("diversity", "diversity"), ("elbo_gap", "ELBO gap"), ("train_s", "train s")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rtb", type=Path, required=True,
                   help="run directory of the digits_even.yaml run (RTB + the mass-covering term)")
    p.add_argument("--rtb-only", type=Path, help="run directory of a run without that term")
    p.add_argument("--kl-rl", type=Path, required=True, help="run directory of the KL-RL run")
    p.add_argument("--guidance", type=Path, required=True, help="output of rtb-ray guidance")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/digits_even_table"))
    args = p.parse_args()
    guidance = json.loads((args.guidance / "guidance_eval.json").read_text())
    best = guidance["best"]
    rows = {"prior (guidance λ=0)": r for r in guidance["scales"] if r["guidance_scale"] == 0}
    rtb = json.loads((args.rtb / "final_eval.json").read_text())
    train = yaml.safe_load((args.rtb / "config.yaml").read_text())["train"]
    mass_covering = train.get("mass_covering", {}).get("weight", 0) > 0
    if args.rtb_only is not None:
        rows["RTB alone"] = json.loads((args.rtb_only / "final_eval.json").read_text())
    rows.update({
        "RTB + mass-covering term" if mass_covering else "RTB": rtb,
        f"guidance (best λ={best['guidance_scale']:g})": best,
        "KL-RL": json.loads((args.kl_rl / "final_eval.json").read_text()),
    })
    lines = ["| method | " + " | ".join(name for _, name in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for method, row in rows.items():
        cells = [f"{row[k]:.3f}" if isinstance(row.get(k), (int, float)) else "–"
                 for k, _ in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {m: {k: r.get(k) for k, _ in COLUMNS} for m, r in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
