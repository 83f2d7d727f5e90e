"""Issue 23's table: what the area-weighted loss, the forcings and static inputs and the EMA of the weights each
do to the forecasts, and all of them together, on the embedded store, at the same budget.

Each row is `ray job submit -- python jobs/train_era5.py` on a local Ray head (bf16 on the GPU), registered in
MLflow, then `jobs/forecast.py --model models:/...` over the test period (after the training and validation
periods) and one `jobs/evaluate.py --definition weatherbench2` of every row beside persistence and the
climatology of the training year. Prints one markdown table (WB2 RMSE and ACC at 6, 24, 72 and 120 h per
variable) and leaves the evaluation's plots in the work folder (and in $OUT when set).

    python benchmarks/forecast_grade.py --work /tmp/fg                    # on the GPU machine, all rows
    python benchmarks/forecast_grade.py --work /tmp/fg --rows baseline all  # some rows (one call each part)
    python benchmarks/forecast_grade.py --work /tmp/fg --evaluate-only      # score what is trained
    python benchmarks/forecast_grade.py --work /tmp/fg --cpu --steps 20     # 2 gloo CPU workers (a check)
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import row_runs  # noqa: E402
from benchmarks.row_runs import run_name  # noqa: E402

FORCINGS = "data.forcings=[local_solar_time, day_of_year, toa_insolation, cos_latitude, longitude]"
STATIC = "data.static=[geopotential_at_surface, land_sea_mask]"
# the EMA's horizon, 1 / (1 - decay) = 200 steps, is an eighth of a row's ~1640; the anchors' 0.999 (a horizon of
# 1000) suits their runs of 10^5 steps and would here average in the first half of training
EMA = "optim.ema_decay=0.995"
PLAIN = "loss.area_weighted=false"  # the loss before issue 23: every grid row weighs the same
ALL = ["loss.area_weighted=true", FORCINGS, STATIC, EMA]
TENDENCY = "model.predict=tendency"  # the decoder predicts each hour's change (docs/models.md, "State or tendency")
ROWS = {
    "baseline": [PLAIN],
    "+area": ["loss.area_weighted=true"],
    "+forcings/static": [PLAIN, FORCINGS, STATIC],
    "+EMA": [PLAIN, EMA],
    "all": ALL,
    "all+tendency": [*ALL, TENDENCY],
    # 12 closed-loop steps instead of 4: the rollout it is scored on is 120 steps long
    "all+tendency+loop12": [*ALL, TENDENCY, "data.teacher_steps=12"],
}
LEADS_H = (6, 24, 72, 120)
TEST = ("2016-04-08", "2016-12-20")  # after data.val_range (2016-01-01 .. 2016-03-31) and its 20-frame context


def budget(steps: int, cpu: bool) -> list[str]:
    """The same for every row: the demo's model and windows (MinConvGRU 3x24, T = 24, 20 teacher-forced), a
    window starting at every hour of 2015 (8736), at most `steps` optimiser steps of 16 windows in 3 epochs (1638
    at most: 546 an epoch), the default learning-rate schedule."""
    per_epoch = max(1, steps // 3)
    return ["model.arch=minconvgru", "data.stride=1", "data.batch_size=16", "optim.epochs=3",
            f"optim.steps_per_epoch={per_epoch}",
            f"checkpoint.val_every={per_epoch}", "checkpoint.val_batches=4", "tracking.log_every=50",
            "tracking.plot=false", *(["parallel.precision=fp32"] if cpu else [])]


def main() -> None:
    parser = row_runs.parser(__doc__, init_every="4D", lead_steps=120)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--steps", type=int, default=1650, help="optimiser steps per row (the budget)")
    parser.add_argument("--evaluate-only", action="store_true", help="forecast and score the trained rows")
    args = parser.parse_args()
    with row_runs.session(args, "forecast grade", "forecast-grade", gpu_cpus=8) as s:
        if not args.evaluate_only:
            row_runs.train_rows(s, {row: [*budget(args.steps, args.cpu), *ROWS[row]] for row in args.rows}, "fg",
                                args.cpu)
        if args.train_only:
            return
        rows = [row for row in ROWS if s.version(run_name(row, "fg"))]
        forecast = ["--coarsen", "2", "--init-start", TEST[0], "--init-end", TEST[1], "--init-every", args.init_every,
                    "--steps", str(args.lead_steps), "--context", "20", "--batch-size", "16",
                    *row_runs.device_args(args.cpu)]
        stores = row_runs.forecast_rows(s, {row: (run_name(row, "fg"), forecast) for row in rows})
    metrics = row_runs.evaluate(s, rows, stores, "--climatology-range", "2015-01-01", "2015-12-31", "--map-leads",
                                "24", "72", "120")
    print(row_runs.table(metrics, rows, LEADS_H), flush=True)
    row_runs.publish(args.work, "forecast_grade")


if __name__ == "__main__":
    main()
