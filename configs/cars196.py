"""Cars196 (TFDS `cars196`): train on classes 0-97, evaluate on 98-195 (split=unseen_classes).

The same recipe as configs/cub.py (ResNet-50, GeM, 512-d, multi-similarity, P x K batches):

    python -m train --config configs/cars196.py --workdir runs/cars196 \
        --config.init_from=~/.cache/torch/hub/checkpoints/resnet50-11ad3fa6.pth

(published numbers to compare with: configs/cub.py's docstring).

TFDS cannot download cars196 itself: its download address no longer serves the files.
Download the Stanford Cars archives yourself and either
  - put them in TFDS's manual folder and prepare from there:
    `tfds build cars196 --manual_dir /data/cars_manual`, then run the command above; or
  - arrange the images one folder per class, folders named so they sort in class order
    (e.g. `001_AM_General_Hummer_SUV_2000`), and train with
    `--config.dataset=folder:/data/cars196_by_class`.
"""

import os

from jaxretrieval.config import load_config_file


def get_config():
    config = load_config_file(os.path.join(os.path.dirname(__file__), "cub.py"))
    config.dataset = "tfds:cars196"
    return config
