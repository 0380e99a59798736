"""CUB-200-2011 (TFDS `caltech_birds2011`): the standard deep-metric-learning protocol.

Train on classes 0-99, evaluate on classes 100-199, every test image a query against all the
others (split=unseen_classes). An ImageNet ResNet-50 fine-tuned at 224x224 (the file sets
the network, the ImageNet normalisation and the evaluation's centre crop), GeM pooling, a
512-d embedding, multi-similarity loss on P x K class-balanced batches, BatchNorm frozen at
the file's statistics, the backbone held still for the first steps while the head settles.
Sized for an accelerator:

    python -m train --config configs/cub.py --workdir runs/cub \
        --config.init_from=~/.cache/torch/hub/checkpoints/resnet50-11ad3fa6.pth

Where the file comes from: torchvision's `resnet50(weights="IMAGENET1K_V2")` downloads it to
that path, and timm's `resnet50` weights (safetensors, in the Hugging Face cache) work too
(docs/pretrained_imagenet.md). Published Recall@1 with 512-d embeddings and ImageNet
backbones, to compare with: multi-similarity (Wang et al., CVPR 2019, BN-Inception) 65.7 on
CUB, 84.1 on Cars196, 78.2 on SOP; Proxy-Anchor (Kim et al., CVPR 2020, BN-Inception) 68.4,
86.1 and 79.1. Musgrave et al. (ECCV 2020) measure these methods under one protocol and find
the gaps between them much smaller; report MAP@R beside Recall@1.

Prepare the dataset once with `tfds build caltech_birds2011` (needs internet), or pass
--config.download=true to let the run download and prepare it. A local copy in the
class-per-folder layout works too: `--config.dataset=folder:/data/CUB_200_2011/images`
(its folders sort as 001.Black_footed_Albatross ... 200.Common_Yellowthroat, so 0-99 stay
the training classes). Smoke run on any machine, from scratch:

    python -m train --config configs/cub.py --workdir /tmp/cub_smoke --config.init_from= \
        --config.num_train_steps=2 --config.global_batch_size=8 --config.image_size=64
"""

from jaxretrieval.config import REQUIRED_INIT, base_config


def get_config():
    config = base_config()
    config.dataset = "tfds:caltech_birds2011"
    config.split = "unseen_classes"
    config.init_from = (REQUIRED_INIT + "an ImageNet ResNet-50 file, e.g. torchvision's "
                        "~/.cache/torch/hub/checkpoints/resnet50-11ad3fa6.pth "
                        "(see docs/pretrained_imagenet.md)")
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
    config.num_train_steps = 4_000
    config.learning_rate = 1e-4
    config.warmup_steps = 200
    config.frozen_backbone_steps = 200
    config.freeze_batch_norm = True
    config.weight_decay = 1e-4
    config.augment.flip = True
    config.augment.crop_scale = (0.16, 1.0)
    config.augment.max_rotation_degrees = 0.0
    config.augment.max_translation = 0.0
    config.augment.brightness = 0.2
    config.augment.contrast = 0.2
    config.augment.saturation = 0.2
    config.checkpoint_every_steps = 1000
    config.log_every_steps = 50
    config.embed_batch_size = 256
    return config
