"""Recall@1 and MAP@R of every loss on unseen classes: the README's loss table.

    python bench/loss_table.py [--only yalefaces|digits] [--losses supcon,triplet]

Each row is one `python -m train` run (printed beside its numbers); workdirs go under
runs/loss_table/. The raw-pixel row comes from the same runs' `pixels/...` metrics.
"""

import argparse
import json
import os
import subprocess
import sys
import time

LOSSES = ("softmax", "normalized_softmax", "arcface", "contrastive", "triplet",
          "multi_similarity", "supcon")
# name -> the command's fixed part; `--config.loss=NAME` is added per row.
DATASETS = {
    "yalefaces": ["--config", "configs/faces.py"],
    "digits": ["--config", "configs/default.py", "--config.split=unseen_classes"],
}


def run(dataset, loss):
    workdir = os.path.join("runs", "loss_table", f"{dataset}_{loss}")
    command = ["python", "-m", "train", *DATASETS[dataset], f"--config.loss={loss}",
               "--workdir", workdir]
    start = time.time()
    subprocess.run([sys.executable, *command[1:]], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    return " ".join(command), metrics, time.time() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=sorted(DATASETS))
    parser.add_argument("--losses", default=",".join(LOSSES))
    args = parser.parse_args()
    print("| dataset | loss | Recall@1 | MAP@R | train+eval s | command |")
    print("|---|---|---|---|---|---|")
    for dataset in [args.only] if args.only else list(DATASETS):
        metrics = None
        for loss in args.losses.split(","):
            command, metrics, seconds = run(dataset, loss)
            print(f"| {dataset} | {loss} | {metrics['recall@1']:.3f} | {metrics['map@r']:.3f} "
                  f"| {seconds:.0f} | `{command}` |", flush=True)
        print(f"| {dataset} | raw pixels | {metrics['pixels/recall@1']:.3f} | "
              f"{metrics['pixels/map@r']:.3f} | - | (any row's `pixels/...` metrics) |",
              flush=True)


if __name__ == "__main__":
    main()
