"""``rtb-ray``: train, pretrain and sample diffusion posteriors with relative trajectory balance."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

# torch is imported by the commands that use it: `rtb-ray status` answers in about a second
from rtb_ray.config import (MAX_WORKERS_PER_ROLE, ConfigError, RunConfig, apply_overrides,
                            check_worker_counts, load_config, validate_config)
from rtb_ray.roles import ROLE_NAMES

if TYPE_CHECKING:
    from rtb_ray.tracking import TrackingRequest

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "configs"

EPILOG = """examples:
  rtb-ray train pipelines/configs/gmm25.yaml --output runs/gmm25
  rtb-ray status runs/gmm25
  rtb-ray scale runs/gmm25 --role posterior=2,prior=1
  rtb-ray train pipelines/configs/gmm25.yaml --resume runs/gmm25
  rtb-ray train pipelines/configs/gmm25.yaml --address auto        (on a Ray cluster)
  rtb-ray train pipelines/configs/gmm25.yaml --in-process --output runs/gmm25-single
  rtb-ray train pipelines/configs/gmm25.yaml --set train.steps=2000 --set train.batch_size=128
  rtb-ray train pipelines/configs/gmm25.yaml --tracking-uri http://127.0.0.1:5000 --experiment gmm
  rtb-ray pretrain gmm25
  rtb-ray train pipelines/configs/digits_even.yaml --output runs/digits-even
  rtb-ray guidance pipelines/configs/digits_even.yaml --output runs/digits-even-guidance
  rtb-ray sample runs/gmm25 --n 10000 --out samples.npz
  rtb-ray train pipelines/configs/gmm25.yaml --register gmm25-posterior
  rtb-ray sample models:/gmm25-posterior/1 --n 10000 --out samples.npz

MLflow: runs go to --tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db (one store for
the runs started in a directory; `mlflow ui` there opens it); the experiment is --experiment,
else $MLFLOW_EXPERIMENT_NAME, else the task name. --resume keeps the run's own store.
"""


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.batch_size=128 (repeatable; "
                        "VALUE is parsed as YAML)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtb-ray",
        description="Train diffusion-model posteriors p_post(x) ∝ p_prior(x)·r(x)^β with relative "
                    "trajectory balance (RTB).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a posterior from a config",
                       description="Fine-tune the posterior of the config's task with RTB on Ray: "
                                   "rollout workers fill an Arrow replay store, a learner trains "
                                   "from it and publishes versioned weights. Writes metrics, "
                                   "evaluation plots, checkpoints and the store to --output.")
    p.add_argument("config", help="experiment YAML, e.g. pipelines/configs/gmm25.yaml")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster to join: 'auto' (the cluster of this machine, e.g. after "
                        "`ray up` / `ray start`) or HOST:PORT (default: start a local Ray)")
    p.add_argument("--in-process", action="store_true",
                   help="no Ray: sample and learn in this one process (the reference loop)")
    p.add_argument("--output", type=Path, help="run directory (default: runs/<config>-<time>)")
    p.add_argument("--resume", metavar="RUN", nargs="?", const=True, default=None,
                   help="continue the run in directory RUN (or --output) from its last "
                        "checkpoint, with its replay store and MLflow run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--tracking-uri", metavar="URI",
                       help="MLflow tracking URI, e.g. http://host:5000 or "
                            "sqlite:////abs/mlflow.db (default: $MLFLOW_TRACKING_URI, else the "
                            "SQLite file mlflow.db in the working directory; on --resume, the "
                            "store the run was started in)")
    where.add_argument("--no-mlflow", action="store_true",
                       help="no MLflow tracking (same as --set tracking.enabled=false)")
    p.add_argument("--experiment", metavar="NAME",
                   help="MLflow experiment (same as --set tracking.experiment=NAME; default: "
                        "$MLFLOW_EXPERIMENT_NAME, else the task name)")
    p.add_argument("--register", metavar="NAME",
                   help="register the final posterior in the MLflow model registry as NAME (a "
                        "new version each time; same as --set tracking.register_as=NAME); sample "
                        "it with `rtb-ray sample models:/NAME/VERSION`")
    _add_overrides(p)

    p = sub.add_parser("status", help="show a live run: workers, versions, throughput, replay",
                       description="Print the rollout workers per role (and their nodes), the "
                                   "weight versions, trajectories/s, the replay store's size and "
                                   "samples/insert ratio of a run that is training.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")

    p = sub.add_parser("scale", help="change the number of rollout workers of a live run",
                       description="Scale a live run's rollout workers; takes effect without a "
                                   "restart. Removed workers finish the call they are in.")
    p.add_argument("run_dir", type=Path)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--workers", type=int, metavar="N",
                     help="N workers in all, split between the roles as in runtime.workers")
    how.add_argument("--role", metavar="ROLE=N[,ROLE=N]", action="append",
                     help="workers per role, e.g. posterior=4,prior=2 (roles: posterior, prior, "
                          "backward; repeatable; roles not named keep their count; at least "
                          "one worker must remain)")

    p = sub.add_parser("pretrain", help="pretrain and cache a task's prior",
                       description="Pretrain the prior of a task and store it where configs find "
                                   "it (task.prior_checkpoint, or the cache folder "
                                   "$RTB_RAY_CACHE, default ~/.cache/rtb-ray).")
    p.add_argument("target", help="a config, or a task: a built-in name (uses "
                                    "pipelines/configs/<name>.yaml), a module path or a .py file")
    p.add_argument("--force", action="store_true", help="retrain even if the checkpoint exists")
    _add_overrides(p)

    p = sub.add_parser("guidance", help="the classifier-guidance (DPS) baseline of an image task",
                       description="Sample the frozen prior with classifier guidance (each "
                                   "reverse mean moved by λ·std·g/rms(g), g = ∇ log r(x̂_0), DPS's "
                                   "gradient) "
                                   "for every scale λ, evaluate each with the task's metrics, and "
                                   "write guidance_eval.json (all scales, and the best: the "
                                   "lowest value of the task's baseline metric, for digits the "
                                   "Fréchet distance to real images of the allowed classes) and "
                                   "sample grids to --output and to MLflow.")
    p.add_argument("config", help="experiment YAML of a DDPM task, e.g. "
                                  "pipelines/configs/digits_even.yaml")
    p.add_argument("--output", type=Path, required=True, help="output directory")
    p.add_argument("--scales", default="0,0.1,0.2,0.5,1,2",
                   help="comma-separated guidance scales λ (default 0,0.1,0.2,0.5,1,2)")
    p.add_argument("--n", type=int, default=2000, help="samples per scale (default 2000)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else mlflow.db in "
                        "the working directory)")
    _add_overrides(p)

    p = sub.add_parser("sample",
                       help="export posterior samples of a run or a registered model",
                       description="Sample the run's latest posterior (or a posterior in the "
                                   "MLflow model registry) and save x and "
                                   "logw = β log r + Σ log p_prior − Σ log p_φ to an .npz file "
                                   "(and cond, each sample's condition, for a conditional task: "
                                   "drawn as training draws them).")
    p.add_argument("source", metavar="RUN",
                   help="a run directory, or a model: models:/NAME/VERSION (registered with "
                        "train --register), models:/NAME@ALIAS, models:/NAME/latest, or the "
                        "models:/<id> a run printed")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="the MLflow store that holds a models:/ URI (default: "
                        "$MLFLOW_TRACKING_URI, else mlflow.db in the working directory)")
    p.add_argument("--n", type=int, default=10_000, help="number of samples (default 10000)")
    p.add_argument("--out", type=Path, required=True, help="output file (.npz is added when missing)")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _config_for_target(target: str, overrides: list[str]) -> RunConfig:
    """``rtb-ray pretrain TARGET``: a config file, a built-in task's shipped config, or any
    task (a name, module or .py file: rtb_ray/tasks.py) with its default settings."""
    path = Path(target)
    if not path.exists() and (DEFAULT_CONFIG_DIR / f"{target}.yaml").exists():
        path = DEFAULT_CONFIG_DIR / f"{target}.yaml"
    if path.exists() and not target.endswith(".py"):
        return load_config(path, overrides)
    from rtb_ray.tasks import task_module

    try:
        task_module(target)
    except ConfigError as err:
        raise ConfigError(f"{target}: neither a config file nor a task ({err})") from None
    return validate_config(apply_overrides({"task": {"name": target}}, overrides))


def tracking_overrides(args: argparse.Namespace) -> list[str]:
    """The train flags that are config settings, as ``--set`` overrides (validated with them)."""
    out = []
    if args.no_mlflow:
        out.append("tracking.enabled=false")
    if args.experiment is not None:
        out.append(f"tracking.experiment={json.dumps(args.experiment)}")  # JSON is YAML: a string
    if args.register is not None:
        out.append(f"tracking.register_as={json.dumps(args.register)}")
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from rtb_ray import pretrain
    from rtb_ray.loop import set_torch_threads
    from rtb_ray.tracking import tracking_request

    cfg = load_config(args.config, args.overrides + tracking_overrides(args))
    # here, before anything is written: the flag, the environment and the working directory of
    # the user's shell (a Ray learner has neither)
    tracking = tracking_request(args.tracking_uri) if cfg.tracking.enabled else None
    set_torch_threads(cfg)  # on Ray too: the driver pretrains a missing prior
    pretrain.PROGRESS_BARS = not args.no_progress  # the bars of task.prior()'s pretraining
    output = args.output
    if isinstance(args.resume, str):
        if output is not None and output.resolve() != Path(args.resume).resolve():
            raise ConfigError(f"--resume {args.resume} and --output {output} name different runs")
        output = Path(args.resume)
    if args.resume and output is None:
        raise ConfigError("--resume needs the run directory: --resume RUN")
    resume = bool(args.resume)
    output = output or Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not args.in_process:
        if args.address is not None and args.address != "auto" and ":" not in args.address:
            raise ConfigError(f"--address: expected 'auto' or HOST:PORT (got {args.address!r})")
        from actors.session import prepare_ray

        prepare_ray(args.address)
        from actors.driver import train_on_ray

        return train_on_ray(cfg, output, address=args.address, resume=resume,
                            tracking=tracking, progress=not args.no_progress)
    if args.address is not None:
        raise ConfigError("--address and --in-process exclude each other")
    return train_in_process(cfg, output, resume, tracking, progress=not args.no_progress)


def train_in_process(cfg: RunConfig, output: Path, resume: bool,
                     tracking: TrackingRequest | None, progress: bool) -> int:
    """The roles inline, the loop, one process (rtb_ray/batches.py InlineBatches)."""
    from rtb_ray.batches import InlineBatches
    from rtb_ray.evaluation import format_eval
    from rtb_ray.loop import prepare, stop_on_signals, train
    from rtb_ray.rollout import Sampler

    run = prepare(cfg, output, resume=resume)
    batches = InlineBatches(cfg, Sampler(run.task, run.learner.prior, run.learner.posterior))
    run.run_dir.start(tracking)
    print(f"run directory: {output}")
    if run.run_dir.tracker is not None:
        print(run.run_dir.tracker.describe())
    stop = threading.Event()
    with stop_on_signals(stop):
        final = train(run, batches, progress=progress, stop=stop)  # Ctrl-C: 130 from main
    print(format_eval(final, run.task.progress_metrics))
    print(f"final metrics: {output / 'final_eval.json'}")
    return 0


def parse_role_counts(texts: list[str]) -> dict[str, int]:
    """``--role`` values (``ROLE=N[,ROLE=N]``, repeatable; a later one wins for its role)."""
    counts = {}
    for item in ",".join(texts).split(","):
        role, sep, n = item.partition("=")
        if not sep or not n.strip().isdigit():
            raise ConfigError(f"--role: expected ROLE=N[,ROLE=N], e.g. posterior=4,prior=2 "
                              f"(got {item!r})")
        counts[role.strip()] = int(n)
    try:
        return check_worker_counts(counts, total=False)
    except ValueError as err:
        raise ConfigError(f"--role: {err}") from None


def split_workers(total: int, shares: dict[str, int]) -> dict[str, int]:
    """``total`` workers split between the roles in proportion to ``shares`` (largest
    remainder), every role with a share keeping at least one when total allows."""
    from rtb_ray.replay.samplers import split_by_quota

    roles = [r for r, n in shares.items() if n > 0]
    counts = dict(zip(roles, split_by_quota(total, [shares[r] for r in roles])))
    for role in roles:  # a role with a share is not starved while another has two
        donor = max(counts, key=counts.get)
        if counts[role] == 0 and counts[donor] > 1:
            counts[role], counts[donor] = 1, counts[donor] - 1
    return {**{r: 0 for r in shares}, **counts}


def cmd_status(args: argparse.Namespace) -> int:
    from actors.session import connect
    from rtb_ray.tracking import open_hint, read_run_record, redact_uri

    record = read_run_record(args.run_dir)  # the store the run used, wherever it was started
    mlflow = None
    if record is not None and "experiment_id" in record:
        mlflow = (f"MLflow: run {record['run_id']}; open it with\n  "
                  f"{open_hint(record['tracking_uri'], record['experiment_id'], record['run_id'])}")
    try:
        _, coordinator = connect(args.run_dir)
    except RuntimeError as err:  # ended or unreachable: where its MLflow run is still helps
        print(f"rtb-ray: {err}", file=sys.stderr)
        if mlflow is not None and not args.json:
            print(mlflow)
        return 1
    import ray

    status = ray.get(coordinator.status.remote())
    if args.json:
        if record is not None:
            status["mlflow"] = {**record, "tracking_uri": redact_uri(record["tracking_uri"])}
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    if mlflow is not None:
        print(mlflow)
    return 0


def format_status(s: dict) -> str:
    lines = [f"run {s['run']}  up {s['uptime_s']:.0f}s"]
    w = s["weights"]
    if w:
        lines.append(f"learner step {w['learner_step']}, weights version {w['version']} "
                     f"({w['published']} published)")
    tp = s["throughput"]
    for role in ROLE_NAMES:
        mine = [x for x in s["workers"] if x["role"] == role and not x["retiring"]]
        nodes = sorted({x["node"][:8] for x in mine if x["node"]})  # those that have sampled
        # pending: Ray has no node for it yet (an autoscaler may be adding one)
        pending = sum(x["state"] == "pending" for x in mine)
        waiting = f" ({pending} pending)" if pending else ""
        lines.append(f"  {role:9s} workers {len(mine)}/{s['targets'][role]}{waiting}  "
                     f"{tp[f'trajectories_per_s_{role}']:8.0f} traj/s  "
                     f"inserted {s['inserted_by_role'][role]:>9d}  nodes {','.join(nodes) or '-'}")
    lines.append(f"  total     {tp['trajectories_per_s']:.0f} traj/s; replaced workers "
                 f"{s['totals']['replaced']}, throttled calls {s['totals']['throttled']}")
    r = s["replay"]
    if r:
        lines.append(f"replay: {r['size']}/{r['capacity']} rows, inserted {r['inserted']}, "
                     f"sampled {r['sampled']}, samples/insert {r['samples_per_insert']:.2f}, "
                     f"quarantined {r['quarantined_rows']}, sealed {r['sealed_rows']}")
    if s["last_error"]:
        lines.append(f"last problem: {s['last_error']}")
    return "\n".join(lines)


def cmd_scale(args: argparse.Namespace) -> int:
    from actors.session import connect

    if args.workers is not None:
        most = MAX_WORKERS_PER_ROLE * len(ROLE_NAMES)
        if not 1 <= args.workers <= most:
            raise ConfigError(f"--workers must be in 1..{most} (got {args.workers})")
        counts = split_workers(args.workers,
                               load_config(args.run_dir / "config.yaml").runtime.workers)
    else:
        counts = parse_role_counts(args.role)
    try:
        _, coordinator = connect(args.run_dir)
    except RuntimeError as err:
        print(f"rtb-ray: {err}", file=sys.stderr)
        return 1
    import ray

    try:
        targets = ray.get(coordinator.scale.remote(counts))
    except ray.exceptions.RayTaskError as err:  # the coordinator refused the counts
        raise ConfigError(str(err.cause)) from None
    print("workers per role: " + ", ".join(f"{r}={n}" for r, n in targets.items()))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from rtb_ray.loop import set_torch_threads
    from rtb_ray.tasks import make_task

    cfg = _config_for_target(args.target, args.overrides)
    set_torch_threads(cfg)
    task = make_task(cfg.task)
    path = task.prior_path()
    if path is None:
        print(f"task {task.name!r} has no prior checkpoint: nothing to pretrain")
        return 0
    if path.exists() and not args.force:
        print(f"prior already cached at {path} (use --force to retrain)")
        return 0
    stats = task.pretrain()
    print(f"prior saved to {path}")
    for k, v in stats.items():
        if isinstance(v, float):
            print(f"  {k}: {v:.4f}")
    return 0


def cmd_guidance(args: argparse.Namespace) -> int:
    from rtb_ray.baselines import guidance_sweep
    from rtb_ray.loop import set_torch_threads
    from rtb_ray.tasks import make_task
    from rtb_ray.tracking import tracking_request

    try:
        scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        raise ConfigError(f"--scales: expected comma-separated numbers (got {args.scales!r})") from None
    if any(s < 0 for s in scales):
        raise ConfigError("--scales: scales must be >= 0")
    if args.n < 2:
        raise ConfigError("--n must be >= 2")
    cfg = load_config(args.config, args.overrides)
    tracking = tracking_request(args.tracking_uri) if cfg.tracking.enabled else None
    set_torch_threads(cfg)
    task = make_task(cfg.task)
    result = guidance_sweep(cfg, task, args.output, scales, args.n, tracking=tracking)
    for row in result["scales"]:
        print(" ".join(f"{k}={row[k]:.4g}" for k in ("guidance_scale", "mean_log_reward",
                                                      *task.progress_metrics) if k in row))
    print(f"best scale {result['best']['guidance_scale']:g} (lowest {task.baseline_metric}); "
          f"results: {args.output / 'guidance_eval.json'}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import tempfile

    if args.n < 1:
        raise ConfigError("--n must be >= 1")
    if not args.source.startswith("models:/"):
        if args.tracking_uri:
            raise ConfigError("--tracking-uri: only for a models:/ URI (a run directory is "
                              "sampled from its own files)")
        run = Path(args.source)
        if not (run / "config.yaml").exists():
            raise ConfigError(f"{run} is not a run directory (no config.yaml)")
        return sample_posterior(run / "config.yaml", run / "checkpoint.pt", args)
    from rtb_ray.run_dir import MODEL_FILES
    from rtb_ray.tracking import download_model_files, tracking_request, tracking_target

    # the same store rule as train's, so that a model registered here is found here
    uri = tracking_target(tracking_request(args.tracking_uri)).uri
    with tempfile.TemporaryDirectory() as tmp:
        files = download_model_files(args.source, uri, MODEL_FILES, Path(tmp))
        if not (files / "config.yaml").is_file():
            raise ConfigError(f"{args.source}: no {MODEL_FILES}/config.yaml in the model: not a "
                              f"posterior logged by rtb-ray train")
        return sample_posterior(files / "config.yaml", files / "posterior.pt", args)


def sample_posterior(cfg_path: Path, weights: Path, args: argparse.Namespace) -> int:
    """``rtb-ray sample``: rebuild the task, prior and posterior from a run's config and its
    checkpoint (a run directory) or posterior file (a logged model), sample, save the .npz."""
    import numpy as np
    import torch

    from rtb_ray.loop import set_torch_threads
    from rtb_ray.rollout import Sampler
    from rtb_ray.run_dir import load_posterior
    from rtb_ray.tasks import make_task
    from rtb_ray.trajectory import Source

    cfg = load_config(cfg_path)
    set_torch_threads(cfg)
    task = make_task(cfg.task)
    prior, posterior, step = load_posterior(task, cfg, weights)
    batch = Sampler(task, prior, posterior).rollout(
        Source.POSTERIOR, args.n, generator=torch.Generator().manual_seed(args.seed))
    logw = cfg.train.objective.beta * batch.log_reward + batch.log_prior - batch.log_behaviour
    out = args.out if args.out.suffix == ".npz" else args.out.with_name(args.out.name + ".npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    cond = {} if batch.cond is None else {"cond": batch.cond.numpy()}  # each row's condition
    np.savez(out, x=batch.terminal.numpy(), logw=logw.numpy(), log_reward=batch.log_reward.numpy(),
             **cond)
    print(f"wrote {args.n} samples to {out} (step {step}, mean logw {logw.mean().item():.4f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"train": cmd_train, "status": cmd_status, "scale": cmd_scale,
                    "pretrain": cmd_pretrain, "guidance": cmd_guidance, "sample": cmd_sample}
        return commands[args.command](args)
    except (ConfigError, OSError, ValueError) as err:  # config, I/O, checkpoint, data
        print(f"rtb-ray: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what was saved, if anything, has been said
        return 130


if __name__ == "__main__":
    sys.exit(main())
