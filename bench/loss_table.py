"""Recall@1 and MAP@R of every loss on unseen classes: the README's loss table.

    python -m bench.loss_table [--only yalefaces|digits] [--recipes supcon,triplet]
        [--seeds 0,1,2]

Each row is one recipe (a loss, or a loss with a projection head) trained once per seed
with `python -m train` (the command is printed beside its numbers; add
`--config.seed=S` for seed S); workdirs go under runs/loss_table/. A row gives the mean
over the seeds and each seed's MAP@R. The raw-pixel row comes from the same runs'
`pixels/...` metrics, which do not depend on the seed.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Recipe name -> its flags beyond the dataset's.
RECIPES = {
    "softmax": ["--config.loss=softmax"],
    "normalized_softmax": ["--config.loss=normalized_softmax"],
    "arcface": ["--config.loss=arcface"],
    "contrastive": ["--config.loss=contrastive"],
    "triplet": ["--config.loss=triplet"],
    "multi_similarity": ["--config.loss=multi_similarity"],
    "supcon": ["--config.loss=supcon"],
    "softmax+triplet": ["--config.loss=softmax+triplet"],
    "softmax+multi_similarity": ["--config.loss=softmax+multi_similarity"],
    "softmax with projection head": ["--config.loss=softmax", "--config.projection_head=256"],
    "supcon with projection head": ["--config.loss=supcon", "--config.projection_head=256"],
}
# Dataset name -> the command's fixed part.
DATASETS = {
    "yalefaces": ["--config", "configs/faces_scratch.py",
                  "--config.dataset=folder:../shared/data/yalefaces"],
    "digits": ["--config", "configs/default.py", "--config.split=unseen_classes"],
}


def workdir_name(dataset, recipe, seed):
    slug = "".join(c if c.isalnum() else "_" for c in recipe).strip("_")
    return os.path.join("runs", "loss_table", f"{dataset}_{slug}_s{seed}")


def run(dataset, recipe, seed):
    """(the command without its seed, metrics, seconds) of one training run."""
    workdir = workdir_name(dataset, recipe, seed)
    command = ["python", "-m", "train", *DATASETS[dataset], *RECIPES[recipe],
               "--workdir", workdir]
    start = time.time()
    subprocess.run([sys.executable, *command[1:], f"--config.seed={seed}"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    return " ".join(command), metrics, time.time() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=sorted(DATASETS))
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"comma-separated, of: {', '.join(RECIPES)}")
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    unknown = [recipe for recipe in recipes if recipe not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe {unknown[0]!r}; use some of {', '.join(RECIPES)}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    print("| dataset | recipe | Recall@1 | MAP@R | MAP@R per seed | train+eval s | command |")
    print("|---|---|---|---|---|---|---|")
    for dataset in [args.only] if args.only else list(DATASETS):
        metrics = None
        for recipe in recipes:
            runs = [run(dataset, recipe, seed) for seed in seeds]
            command = runs[0][0]
            recall = statistics.mean(m["recall@1"] for _, m, _ in runs)
            maps = [m["map@r"] for _, m, _ in runs]
            seconds = statistics.median(s for _, _, s in runs)
            print(f"| {dataset} | {recipe} | {recall:.3f} | {statistics.mean(maps):.3f} | "
                  f"{' / '.join(f'{m:.3f}' for m in maps)} | {seconds:.0f} | `{command}` |",
                  flush=True)
            metrics = runs[0][1]
        print(f"| {dataset} | raw pixels | {metrics['pixels/recall@1']:.3f} | "
              f"{metrics['pixels/map@r']:.3f} | - | - | (any row's `pixels/...` metrics) |",
              flush=True)


if __name__ == "__main__":
    main()
