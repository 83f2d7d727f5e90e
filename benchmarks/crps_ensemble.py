"""Issue 27, item 3: does training on the ensemble loss (`loss.kind=crps`) give a better ensemble than perturbing
a deterministic model's inputs, at equal cost?

Two rows train with the forecast-grade recipe (configs/era5_forecast_grade.yaml) on the embedded store, at the
same cost: the same optimiser steps, and the same windows through the model at each step.
- "mse": batches of 2M windows, the plain (area-weighted) squared error;
- "crps": batches of 2 windows, each read by M members with their own input noise of std S (`loss.members=M`,
  `data.input_noise=S`), the almost-fair CRPS.

Each model forecasts 8 members from the same init times, with members from input noise:
- the mse model at S (the noise the crps model trained with) and at 4S (a wider spread: the perturbed ensemble's
  one knob);
- the crps model at S, the noise it was trained with.

The mse model also forecasts once without noise. One `jobs/evaluate.py --definition weatherbench2` scores all of
them beside persistence and the 2015 climatology. Prints CRPS, ensemble-mean RMSE and the spread/skill ratio at
the table's leads; the plots (CRPS, spread/skill, rank histograms) stay in the work folder's eval/.

    python benchmarks/crps_ensemble.py --work /tmp/crps --cpu           # 2 gloo CPU workers, fp32
    python benchmarks/crps_ensemble.py --work /tmp/crps                 # one GPU, bf16
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import row_runs  # noqa: E402
from benchmarks.row_runs import run_name  # noqa: E402

TEST = ("2016-04-08", "2016-12-20")  # after data.val_range (2016-01-01 .. 2016-03-31) and its 20-frame context
LEADS_H = (6, 24, 72)
COLUMNS = {"crps": ("CRPS", ".4g"), "ensemble_mean_rmse": ("RMSE of mean", ".4g"),
           "spread_skill_ratio": ("spread/skill", ".4g")}


def rows(members: int, noise: float) -> dict[str, list[str]]:
    """The two rows' own settings: equal windows through the model per step (mse: 2M; crps: 2 x M members)."""
    return {"mse": [f"data.batch_size={2 * members}"],
            "crps": ["data.batch_size=2", "loss.kind=crps", f"loss.members={members}", f"data.input_noise={noise}"]}


def budget(steps: int, cpu: bool) -> list[str]:
    """What both rows share: the demo's model and windows (MinConvGRU 3x24, T = 24, 20 teacher-forced) on 2015,
    `steps` optimiser steps in 3 epochs."""
    per_epoch = max(1, steps // 3)
    return ["model.arch=minconvgru", "data.stride=1", "optim.epochs=3", f"optim.steps_per_epoch={per_epoch}",
            f"checkpoint.val_every={per_epoch}", "checkpoint.val_batches=2", "tracking.log_every=25",
            "tracking.plot=false", *(["parallel.precision=fp32"] if cpu else [])]


def main() -> None:
    parser = row_runs.parser(__doc__, init_every="8D", lead_steps=72)
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps of each row")
    parser.add_argument("--members", type=int, default=2, help="M: the crps row's members per window")
    parser.add_argument("--noise", type=float, default=0.05, help="S: input noise, in normalised units")
    args = parser.parse_args()
    with row_runs.session(args, "crps vs perturbed ensemble", "crps-ensemble", gpu_cpus=4) as s:
        settings = {row: [*row_runs.recipe(), *budget(args.steps, args.cpu), *own]
                    for row, own in rows(args.members, args.noise).items()}
        row_runs.train_rows(s, settings, "ce", args.cpu)
        if args.train_only:
            return
        common = ["--coarsen", "2", "--init-start", TEST[0], "--init-end", TEST[1], "--init-every", args.init_every,
                  "--steps", str(args.lead_steps), "--context", "20", "--batch-size", "32",
                  *row_runs.device_args(args.cpu)]
        ensemble = ["--members", "8", "--seed", "1", "--perturbation-std"]
        forecasts = {
            "mse, deterministic": (run_name("mse", "ce"), common),
            f"mse, 8 members, std {args.noise:g}": (run_name("mse", "ce"), [*common, *ensemble, f"{args.noise:g}"]),
            f"mse, 8 members, std {4 * args.noise:g}": (run_name("mse", "ce"),
                                                         [*common, *ensemble, f"{4 * args.noise:g}"]),
            f"crps, 8 members, std {args.noise:g}": (run_name("crps", "ce"), [*common, *ensemble, f"{args.noise:g}"]),
        }
        stores = row_runs.forecast_rows(s, forecasts)
    labels = list(forecasts)
    metrics = row_runs.evaluate(s, labels, stores, "--climatology-range", "2015-01-01", "2015-12-31",
                                "--rank-leads", "24", "72")
    print(row_runs.table(metrics, labels, LEADS_H, COLUMNS), flush=True)
    row_runs.publish(args.work, "crps_ensemble")


if __name__ == "__main__":
    main()
