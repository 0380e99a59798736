"""Stanford Online Products (TFDS `stanford_online_products`): its own class-disjoint splits.

11,318 products to train on, 11,316 others to evaluate leave-one-out (split=dataset_splits
reads TFDS's `train` and `test` splits); labels are `class_id`. The recipe of configs/cub.py
with more classes per batch and 2 images each, as SOP has about 5 images per product:

    python -m train --config configs/sop.py --workdir runs/sop \
        --config.init_from=~/.cache/torch/hub/checkpoints/resnet50-11ad3fa6.pth

Published numbers to compare with are in configs/cub.py's docstring.
"""

import os

from jaxretrieval.config import load_config_file


def get_config():
    config = load_config_file(os.path.join(os.path.dirname(__file__), "cub.py"))
    config.dataset = "tfds:stanford_online_products"
    config.label_key = "class_id"
    config.split = "dataset_splits"
    config.images_per_class = 2
    config.num_train_steps = 8_000
    return config
