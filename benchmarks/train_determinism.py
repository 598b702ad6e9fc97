"""Is training reproducible on this machine? Two short trainings with the same seed, compared.

    python benchmarks/train_determinism.py                    # two runs, TensorFlow defaults
    python benchmarks/train_determinism.py --op-determinism   # with tf.config.experimental.enable_op_determinism()
    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/train_determinism.py --op-determinism

Each run is a fresh process training DenseNet-169 on POLEN23E fold 0 with the study's recipe
(cam.study.train) shortened to ``--epochs`` epochs at ``--size`` px, no BatchNorm
re-estimation and no fine-tuning, seed 0. The table says whether the final weights are
identical, the largest difference, and each run's losses and held-out accuracy. About 5
minutes per run on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import hashlib, json, os, sys, time
import numpy as np
import tensorflow as tf
if {op_determinism}:
    tf.config.experimental.enable_op_determinism()
from cam.study import data, train
cfg = train.TrainConfig(train_size={size}, eval_size={size}, epochs={epochs}, warmup_epochs=1,
                        eval_every={epochs}, recalibrate_bn=False, finetune_epochs=0, seed=0)
started = time.time()
model, curve, summary, _ = train.train(data.polen23e_root(), data.read_fold_table(),
                                       data.POLEN23E_CLASSES, cfg, out_stem=None)
weights = model.get_weights()
np.savez(sys.argv[1], *weights)
print("RESULT " + json.dumps({{
    "sha256": hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in weights)).hexdigest()[:16],
    "held-out accuracy": summary["held_out_accuracy_at_{size}px"],
    "loss per epoch": [round(v, 4) for v in curve["loss"]], "seconds": round(time.time() - started)}}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=96, help="training and evaluation size (px)")
    parser.add_argument("--op-determinism", action="store_true",
                        help="call tf.config.experimental.enable_op_determinism() first")
    args = parser.parse_args(argv)
    if args.runs < 2:
        parser.error("--runs must be at least 2 to compare anything")
    import numpy as np
    import pandas as pd

    code = CHILD.format(op_determinism=args.op_determinism, size=args.size, epochs=args.epochs)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    rows, weights = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            path = Path(tmp) / f"run{run}.npz"
            print(f"run {run + 1}/{args.runs} ...", flush=True)
            done = subprocess.run([sys.executable, "-c", code, str(path)], env=env,
                                  capture_output=True, text=True)
            result = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if done.returncode or not result:
                sys.stderr.write(done.stderr[-3000:])
                raise SystemExit(f"error: run {run + 1} failed (exit status {done.returncode})")
            rows.append({"run": run + 1, **json.loads(result[0][len("RESULT "):])})
            with np.load(path) as saved:
                weights.append([saved[k] for k in saved.files])
    first = weights[0]
    for row, other in zip(rows, weights):
        diffs = [float(np.abs(a - b).max()) for a, b in zip(first, other)]
        row["arrays equal to run 1"] = f"{sum(d == 0 for d in diffs)}/{len(diffs)}"
        row["max |w - w_run1|"] = max(diffs)
    table = pd.DataFrame(rows).set_index("run")
    print(f"\n{args.epochs} epochs at {args.size} px, seed 0, op determinism "
          f"{'on' if args.op_determinism else 'off'}, TF_ENABLE_ONEDNN_OPTS="
          f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}, {os.cpu_count()} CPUs")
    print(table.to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
