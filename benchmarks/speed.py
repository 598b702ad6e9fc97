"""Speed table from the command line: the study of notebooks/04-speed.ipynb without a notebook.

    python benchmarks/speed.py [--images 8] [--repeats 3] [--batch-size 64] [--budget 30]
                               [--layers relu,conv4_block32_concat] [--windows 1,2,3]
                               [--no-peer] [--no-others] [--scorecam-channels 32]
                               [--occlusion 32,32] [--random-weights] [--csv PATH]
                               [--no-seed-head | --seed-head-only]

DenseNet-169 at 224x224: the committed POLEN23E checkpoint when present (else random weights,
said in the output), on held-out POLEN23E images when $POLEN23E_DIR is set (else random
pixels with a fixed seed). Prints the machine, the table (cam.study.speed.SpeedStudy), the
head-only speed-ups and the study's own wall time per method and mode, then the rows and goals
of the FastAblationCAM reference's head on the same trunk (cam.study.seed_head: Ablation-CAM
and FastAblationCAM w1 at `relu`, score="probability", against that model's forward pass), as
Markdown. Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cam  # noqa: E402
import pandas as pd  # noqa: E402
from cam.study import data, models, paths, seed_head, speed  # noqa: E402

IMAGE_SIZE, SEED = 224, 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8, help="images per call (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (default 3)")
    p.add_argument("--batch-size", type=int, default=64, help="ablations per batch (default 64)")
    p.add_argument("--budget", type=float, default=30.0,
                   help="seconds a row may take before it is extrapolated (default 30)")
    p.add_argument("--layers", default="", help="comma-separated layers (default: the study's 3)")
    p.add_argument("--windows", default="1,2,3", help="FastAblationCAM windows (default 1,2,3)")
    p.add_argument("--no-peer", action="store_true", help="leave out tf-keras-vis")
    p.add_argument("--no-others", action="store_true",
                   help="leave out the methods timed at the first layer only (Grad-CAM++, "
                        "XGrad-CAM, LayerCAM, HiResCAM, ReciproCAM, Score-CAM, Occlusion)")
    p.add_argument("--scorecam-channels", type=int, default=speed.SCORECAM_CHANNELS,
                   help=f"channels of the Faster Score-CAM row (default "
                        f"{speed.SCORECAM_CHANNELS}; 0 leaves it out)")
    p.add_argument("--occlusion", default=",".join(map(str, speed.OCCLUSION)),
                   help="Occlusion window,stride in pixels (default %(default)s)")
    p.add_argument("--random-weights", action="store_true", help="ignore the checkpoint")
    p.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    seed = p.add_mutually_exclusive_group()
    seed.add_argument("--no-seed-head", action="store_true",
                      help="leave out the rows of the reference's head (GAP, Dense(1664), "
                           "Dense(23, softmax)) at relu")
    seed.add_argument("--seed-head-only", action="store_true",
                      help="time only the forward pass, Ablation-CAM and FastAblationCAM w1 "
                           "on the reference's head")
    args = p.parse_args(argv)
    if min(args.images, args.repeats, args.batch_size) < 1:
        p.error("--images, --repeats and --batch-size must be >= 1")
    args.layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    try:
        args.windows = [int(w) for w in args.windows.split(",")]
    except ValueError:
        p.error(f"--windows must be comma-separated integers, got {args.windows!r}")
    try:
        args.occlusion = tuple(int(v) for v in args.occlusion.split(","))
    except ValueError:
        args.occlusion = ()
    if len(args.occlusion) != 2:
        p.error(f"--occlusion must be two integers WINDOW,STRIDE, got {args.occlusion!r}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        if args.random_weights:
            raise FileNotFoundError("--random-weights")
        model, _ = models.load_checkpoint(models.CHECKPOINT_STEM, paths.MODELS_DIR, IMAGE_SIZE)
        weights = f"checkpoint {models.CHECKPOINT_STEM}"
    except FileNotFoundError:
        model = models.build_densenet169(23, image_size=IMAGE_SIZE)
        weights = "random weights"
    images, source = data.held_out_sample(args.images, IMAGE_SIZE, SEED)
    print("\n".join(f"- {k}: {v}" for k, v in speed.machine().items()))
    print(f"- model: DenseNet-169 at {IMAGE_SIZE}x{IMAGE_SIZE}, {weights}; {source}\n")
    tables = []
    if not args.seed_head_only:
        tables.append(study_table(model, images, args))
    if not args.no_seed_head:
        rows, seed_paths = seed_head.seed_head_rows(model, images, repeats=args.repeats,
                                                budget_s=max(args.budget, 60.0), progress=True)
        print(rows.drop(columns=["notes"]).to_markdown(index=False, floatfmt=".2f"))
        print(f"\nThe library's path per method: {seed_paths}\n")
        print(seed_head.seed_goals(rows).to_markdown(index=False, floatfmt=".2f"))
        tables.append(rows)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        pd.concat(tables, ignore_index=True).to_csv(args.csv, index=False)


def study_table(model, images, args):
    """The speed study's table, printed with its speed-ups and the study's own time."""
    study = speed.SpeedStudy(model, images, repeats=args.repeats, batch_size=args.batch_size,
                             budget_s=args.budget)
    table = study.run(args.layers or speed.study_layers(model), args.windows,
                      peer=not args.no_peer, others=not args.no_others,
                      occlusion=args.occlusion, scorecam_channels=args.scorecam_channels)
    print(table.drop(columns=["notes"]).to_markdown(index=False, floatfmt=".1f"))
    print()
    print(speed.speed_ups(table).to_markdown(index=False, floatfmt=".1f"))
    print()
    wall = study.wall_times()
    wall["mode"] = wall["mode"].fillna("")
    by_mode = wall.groupby(["method", "mode"], sort=False).agg(
        rows=("seconds", "size"), seconds=("seconds", "sum"), cpu=("CPU seconds", "sum"))
    print(by_mode.rename(columns={"seconds": "study s", "cpu": "study CPU s"}).to_markdown(
        floatfmt=".1f"))
    print(f"\nThe study took {wall['seconds'].sum():.0f} s ({wall['CPU seconds'].sum():.0f} "
          f"CPU s).\n")
    return table


if __name__ == "__main__":
    cam  # the package import sets TensorFlow's log level before TensorFlow loads
    main()
