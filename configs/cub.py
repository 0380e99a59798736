"""CUB-200-2011 (TFDS `caltech_birds2011`): the standard deep-metric-learning protocol.

Train on classes 0-99, evaluate on classes 100-199, every test image a query against all the
others (split=unseen_classes). ResNet-50 from scratch at 224x224, GeM pooling, a 512-d
embedding, multi-similarity loss on P x K class-balanced batches. Sized for an accelerator:

    python -m train --config configs/cub.py --workdir runs/cub

TFDS downloads and prepares the dataset on first use (needs internet). A local copy in the
class-per-folder layout works too: `--config.dataset=folder:/data/CUB_200_2011/images`
(its folders sort as 001.Black_footed_Albatross ... 200.Common_Yellowthroat, so 0-99 stay
the training classes). Smoke run on any machine:

    python -m train --config configs/cub.py --workdir /tmp/cub_smoke \
        --config.num_train_steps=2 --config.global_batch_size=8 --config.image_size=64
"""

from jaxretrieval.config import base_config


def get_config():
    config = base_config()
    config.dataset = "tfds:caltech_birds2011"
    config.split = "unseen_classes"
    config.image_size = 224
    config.channels = 3
    config.model.name = "resnet50"
    config.model.small_stem = False
    config.model.pooling = "gem"
    config.embedding_dim = 512
    config.loss = "multi_similarity"
    config.sampler = "class_balanced"
    config.images_per_class = 4
    config.global_batch_size = 128
    config.num_train_steps = 20_000
    config.learning_rate = 1e-3
    config.warmup_steps = 1000
    config.weight_decay = 1e-4
    config.augment.flip = True
    config.augment.max_rotation_degrees = 5.0
    config.augment.max_translation = 0.1
    config.augment.brightness = 0.2
    config.augment.contrast = 0.2
    config.checkpoint_every_steps = 1000
    config.log_every_steps = 50
    config.embed_batch_size = 256
    return config
