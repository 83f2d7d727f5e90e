"""Issue 24's experiment: do long training windows, stateful training, and a warm-up over the whole record make
better forecasts than the default window?

One store with the atmosphere's time scales (the embedded store's model, docs/data.md, over 2010-2016 at 16x32,
so that a year-long window fits in a split): MinConvGRU with the forecast-grade recipe
(configs/era5_forecast_grade.yaml) trained on windows of T = 24, 168, 720 and 8760 hours (the last in time chunks,
`model.chunk_size`) and on stateful windows of 24 (`data.stateful`: the state carried from window to window),
each with 4 closed-loop steps and **the same number of frames seen** (`--frames`, 629k by default: what
`forecast_grade.py` gives its T = 24 rows); batches shrink with T (16, 4, 1, 1) and so do the optimiser steps.
The ablation of item 4 adds rows that give the closed loop the short window's share of the loss ("cl-share")
and rows whose retain gates start with time constants up to 30 days ("chrono", `model.chrono_max`) or a week
("chrono168"), and a T = 720 row at 3x the learning rate (it takes a third of the T = 24 row's optimiser steps).
Every model forecasts 15 days from the same init times twice: with `--context T` (its training window) and with
`--warmup all` (one pass over the record from 2010). One `jobs/evaluate.py --definition weatherbench2` scores
them all beside persistence and the climatology of the training years. Prints the table (WB2 RMSE and ACC at
1-15 days per variable) and leaves the skill-vs-lead plots in the work folder's eval/ (and $OUT/long_context):
windows_*.png, a panel per training window.

    python benchmarks/long_context.py --work /tmp/lc             # on the GPU machine; run again to continue
    python benchmarks/long_context.py --work /tmp/lc --rows T=24 T=168 --cpu --frames 4000 --lead-steps 48
                                                                 # 2 gloo CPU workers, small (a check)

Rows train at once on shares of the GPU; a row cut off by a device call's time limit resumes from its newest
checkpoint when the script runs again on the same warm machine (`row_runs.train_rows`).
"""
from __future__ import annotations

import datetime
import math
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import row_runs  # noqa: E402
from benchmarks.row_runs import run_name  # noqa: E402
from minconv_dist.data import write_synthetic_era5  # noqa: E402

PERIOD = ("2010-01-01", "2017-01-01")  # the store, [start, end)
TRAIN = ("2010-01-01", "2014-12-31")  # 43824 hours
VAL = ("2015-01-01", "2016-03-31")  # longer than a year: one validation window of T = 8760 + 1 frames
TEST = ("2016-04-08", "2016-12-10")  # init times; 15 days after the last stay inside the store
LEADS_H = (24, 72, 120, 168, 240, 360)
CLOSED_LOOP = 4  # closed-loop steps of every training window (data.teacher_steps = T - 4)
SHORT_T = 24  # the default window, the rows' baseline


def closed_loop_share(T: int) -> list[str]:
    """`loss.lead_weights` that give a window of T the default window's split of the loss: its T - 4 one-step
    predictions weigh, in all, 20/4 of its 4 closed-loop steps (uniform weights give the closed loop 4/T of the
    loss: 17% at T = 24, 0.6% at T = 720). Ablation of item 4's "loss weighting of early vs late frames"."""
    teacher = (SHORT_T - CLOSED_LOOP) / (T - CLOSED_LOOP)
    return [f"loss.lead_weights=[{teacher:.6g}{', 1' * CLOSED_LOOP}]"]


CHRONO = "model.chrono_max=720"  # retain gates' time constants spread over 2 h .. 30 days (item 4's gate init)
# row -> (T, windows per batch, extra settings)
ROWS: dict[str, tuple[int, int, list[str]]] = {
    "T=24": (SHORT_T, 16, []),
    "stateful T=24": (SHORT_T, 16, ["data.stateful=true"]),
    "T=168": (168, 4, []),
    "T=720": (720, 1, []),
    "T=8760": (8760, 1, ["model.chunk_size=730"]),
    "T=168 cl-share": (168, 4, closed_loop_share(168)),
    "T=720 cl-share": (720, 1, closed_loop_share(720)),
    "T=24 chrono": (SHORT_T, 16, [CHRONO]),
    "stateful T=24 chrono": (SHORT_T, 16, ["data.stateful=true", CHRONO]),
    "T=720 cl-share chrono": (720, 1, [*closed_loop_share(720), CHRONO]),
    "stateful T=24 chrono168": (SHORT_T, 16, ["data.stateful=true", "model.chrono_max=168"]),  # up to a week
    "T=720 cl-share lr 3e-3": (720, 1, [*closed_loop_share(720), "optim.lr=3e-3"]),  # its 873 steps, 3x the lr
}


def schedule(row: str, frames: int, cpu: bool) -> list[str]:
    """A row's windows and budget: `frames` frames seen in all (optimiser steps = frames / (batch x T)), in 3
    epochs, or in as many as a stateful row needs (its epoch walks each stream once: hours / (T x batch x ranks)
    steps at most)."""
    T, batch, extra = ROWS[row]
    steps = max(1, frames // (batch * T))
    stateful = "data.stateful=true" in extra
    hours = (datetime.date.fromisoformat(TRAIN[1]) - datetime.date.fromisoformat(TRAIN[0])).days * 24 + 24
    most = max(1, hours // (T * batch * (2 if cpu else 1))) if stateful else steps  # steps an epoch can hold
    epochs = max(3, math.ceil(steps / most)) if steps >= 3 else 1
    per_epoch = math.ceil(steps / epochs)
    return [f"data.sequence_length={T}", f"data.teacher_steps={T - CLOSED_LOOP}", f"data.batch_size={batch}",
            f"data.stride={T if stateful else 1}", f"optim.epochs={epochs}", f"optim.steps_per_epoch={per_epoch}",
            f"checkpoint.val_every={per_epoch}", "checkpoint.val_batches=2", "tracking.log_every=20",
            "tracking.plot=false", *(["parallel.precision=fp32"] if cpu else []), *extra]


def plot_windows(metrics: pd.DataFrame, channel: str, path: Path) -> None:
    """RMSE vs lead, one panel per trained row: its `--context T` and `--warmup all` forecasts beside the T = 24
    row's (the baseline), persistence and climatology. The y axis stops at 2.5x climatology's RMSE."""
    rmse = metrics[(metrics.metric == "weighted_rmse") & (metrics.channel == channel)]

    def curve(source: str) -> pd.Series:
        return rmse[rmse.source == source].set_index("lead_time_h").value.sort_index()

    rows = [row for row in ROWS if not curve(f"{row}, warmup all").empty]
    top = 2.5 * curve("climatology").mean()
    fig = Figure(figsize=(16, 3.2 * math.ceil(len(rows) / 4)), layout="constrained")
    axes = fig.subplots(math.ceil(len(rows) / 4), 4, sharex=True, sharey=True, squeeze=False).ravel()
    baseline = curve(f"T={SHORT_T}, context {SHORT_T}")
    for ax, row in zip(axes, rows):
        ax.plot(baseline.index, baseline, color="black", lw=1, label=f"T={SHORT_T}, context {SHORT_T}")
        for source, style in ((f"{row}, context {ROWS[row][0]}", "-"), (f"{row}, warmup all", "--")):
            line = curve(source)
            ax.plot(line.index, line, style, color="tab:blue" if style == "-" else "tab:red",
                    label=source.removeprefix(f"{row}, "))
        for source, style in (("persistence", ":"), ("climatology", "-.")):
            line = curve(source)
            ax.plot(line.index, line, style, color="grey", lw=1, label=source)
        ax.set(title=row, ylim=(0, top), xlabel="lead [h]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    fig.suptitle(f"{channel}: WeatherBench2 RMSE vs lead, by training window")
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = row_runs.parser(__doc__, init_every="6D", lead_steps=360)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--frames", type=int, default=16 * 24 * 1638, help="frames seen by every row")
    args = parser.parse_args()
    store = args.work / "era5_2010-2016_16x32.zarr"
    data = [f"data.url={store}", "data.coarsen=1", f"data.train_range=[{TRAIN[0]}, {TRAIN[1]}]",
            f"data.val_range=[{VAL[0]}, {VAL[1]}]", "model.arch=minconvgru"]
    with row_runs.session(args, "long context", "long-context", gpu_cpus=12) as s:
        if not store.exists():
            write_synthetic_era5(str(store), start=PERIOD[0], end=PERIOD[1], nlat=16, nlon=32, chunks=240,
                                 layout="weatherbench2")
        row_runs.train_rows(s, {row: [*data, *row_runs.recipe(), *schedule(row, args.frames, args.cpu)]
                                for row in args.rows},
                            "lc", args.cpu)
        if args.train_only:
            return
        common = ["--data", str(store), "--init-start", TEST[0], "--init-end", TEST[1], "--init-every",
                  args.init_every, "--steps", str(args.lead_steps), "--batch-size", "8",
                  *row_runs.device_args(args.cpu)]
        forecasts = {}
        for row in args.rows:
            forecasts[f"{row}, context {ROWS[row][0]}"] = (run_name(row, "lc"), [*common, "--context", str(ROWS[row][0])])
            forecasts[f"{row}, warmup all"] = (run_name(row, "lc"), [*common, "--warmup", "all"])
        stores = row_runs.forecast_rows(s, forecasts)
    labels = list(forecasts)
    metrics = row_runs.evaluate(s, labels, stores, "--truth", str(store), "--climatology-range", *TRAIN,
                                "--map-leads", "24", "120", "360")
    print(row_runs.table(metrics, labels, LEADS_H), flush=True)
    for channel in metrics.channel.unique():
        plot_windows(metrics, channel, args.work / "eval" / f"windows_{channel.replace('@', '_')}.png")
    row_runs.publish(args.work, "long_context")


if __name__ == "__main__":
    main()
