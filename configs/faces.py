"""Faces in a class-per-folder layout, evaluated on identities never seen in training.

    python -m train --config configs/faces.py --workdir runs/faces

trains on ../shared/data/yalefaces (15 subjects: the first 7 train, the other 8 are the
queries and gallery, split=unseen_classes). Any other face folder, with no other change:

    python -m train --config configs/faces.py --workdir runs/my_faces \
        --config.dataset=folder:/path/to/faces

The recipe for small face sets: 64x64 grayscale, the seed CNN with BatchNorm and GeM, P x K
class-balanced batches (every identity in a batch has 8 images), lighting and pose
augmentation, and softmax cross-entropy, the best on yalefaces' unseen identities (mean
MAP@R over three seeds) of the losses, sums of losses and projection heads compared in
BENCHMARKS.md; any other is one flag away, e.g. `--config.loss=arcface`.
The 165 images of yalefaces train and evaluate in under a minute on a 2-core CPU.
"""

from jaxretrieval.config import base_config


def get_config():
    config = base_config()
    config.dataset = "folder:../shared/data/yalefaces"
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
