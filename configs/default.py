"""The offline default: scikit-learn's digits (upsampled to 32x32x1), a small seed-style CNN.

    python -m train --config configs/default.py --workdir runs/default

(`python -m train` with no flags runs the same.) Smoke run in seconds:

    python -m train --config configs/default.py --workdir /tmp/smoke --config.num_train_steps=20
"""

from jaxretrieval.config import base_config


def get_config():
    return base_config()
