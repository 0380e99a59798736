"""Faces trained from scratch: the recipe before the pretrained network, kept as its baseline.

    python -m train --config configs/faces_scratch.py --workdir runs/faces_scratch \
        --config.dataset=folder:PATH

PATH holds one sub-folder of photos per person; split=unseen_classes trains on the first half
of the identities (in folder-name order) and evaluates on the others. The recipe for small
face sets on a CPU: 64x64 grayscale, the seed CNN with BatchNorm and GeM, P x K
class-balanced batches (8 images of each identity in a batch), lighting and pose
augmentation, and softmax cross-entropy, which gave the best mean MAP@R over three seeds of
every loss tried on yalefaces (BENCHMARKS.md, "Retrieval on unseen classes"). The
pretrained network of `configs/faces.py` is far ahead of it on the same split.
"""

from jaxretrieval.config import base_config


def get_config():
    config = base_config()
    config.dataset = ""  # required: --config.dataset=folder:PATH
    config.split = "unseen_classes"
    config.image_size = 64
    config.channels = 1
    config.model.widths = (32, 64, 128)
    config.model.batch_norm = True
    config.model.pooling = "gem"
    config.embedding_dim = 64
    config.loss = "softmax"
    config.sampler = "class_balanced"
    config.images_per_class = 8
    config.global_batch_size = 56
    config.num_train_steps = 400
    config.learning_rate = 2e-3
    config.warmup_steps = 40
    config.weight_decay = 1e-4
    config.augment.flip = True
    config.augment.max_rotation_degrees = 10.0
    config.augment.max_translation = 0.08
    config.augment.brightness = 0.2
    config.augment.contrast = 0.3
    config.log_every_steps = 20
    config.checkpoint_every_steps = 200
    return config
