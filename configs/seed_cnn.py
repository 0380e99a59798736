"""The seed's exact model: 224x224x3 input, Conv32-Pool-Conv64-Pool-Conv128-Pool-Dense128.

3x3 VALID convolutions with ReLU, 2x2 max-pools, flatten, Dense(128); the Dense(128) output
is the embedding (L2-normalised), and the seed's sigmoid output is replaced by the
softmax classification head used for training. Runs on any dataset, e.g. a face folder:

    python -m train --config configs/seed_cnn.py --workdir runs/seed_cnn \
        --config.dataset=folder:../shared/data/yalefaces

It is slow on a CPU (about 20 GFLOPs per image and step); a smoke run:

    python -m train --config configs/seed_cnn.py --workdir /tmp/seed_smoke \
        --config.dataset=folder:../shared/data/yalefaces --config.num_train_steps=4 \
        --config.global_batch_size=8
"""

from jaxretrieval.config import base_config


def get_config():
    config = base_config()
    config.image_size = 224
    config.channels = 3
    config.model.widths = (32, 64, 128)
    config.model.kernel_size = 3
    config.model.padding = "VALID"
    config.model.batch_norm = False
    config.model.pooling = "flatten"
    config.model.hidden_dim = 0
    config.embedding_dim = 128
    config.augment.flip = True
    config.global_batch_size = 32
    config.num_train_steps = 500
    config.learning_rate = 1e-3
    config.checkpoint_every_steps = 100
    config.embed_batch_size = 64
    return config
