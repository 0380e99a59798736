"""Face recognition on dlib's pretrained face ResNet, for any class-per-folder face set.

    python -m train --config configs/faces.py --config.dataset=folder:PATH --workdir runs/faces

PATH holds one sub-folder of photos per person. Every photo is detected and aligned to
dlib's 150x150 face chip (5-point landmarks, cached on disk per dataset) and embedded by
dlib's face ResNet, read from the installed face-recognition-models package (the `[faces]`
extra: pip install -e ".[faces]"). No training by default: the run embeds, evaluates the
unseen_classes split (the identities of the second half of the folders, in name order, are
the queries and the gallery), calibrates the match threshold and builds the index; search
and the service take photos as they are and align them the same way.

Fine-tuning on the training identities is one flag away, e.g. --config.num_train_steps=100:
softmax cross-entropy on class-balanced P x K batches, AdamW at 1e-4 for the head and a tenth
of that for the pretrained network (at 1e-3 AdamW's steps wreck the pretrained weights in a
few dozen steps), with flips and small shifts. --config.model.flip_test=true embeds each
photo and its mirror image and uses their mean.
"""

from jaxretrieval.config import base_config
from jaxretrieval.data.faces import CHIP_SIZE, FACE_RESNET_FILE, face_model_file


def get_config():
    config = base_config()
    config.dataset = ""  # required: --config.dataset=folder:PATH
    config.split = "unseen_classes"

    # The network and its input; loading the file sets and checks these too.
    config.init_from = face_model_file(FACE_RESNET_FILE)
    config.image_size = CHIP_SIZE
    config.channels = 3
    config.model.name = "dlib_face_resnet"
    config.model.input_norm = "dlib"
    config.model.pooling = "avg"
    config.model.hidden_dim = 0
    config.embedding_dim = 128
    config.model.align_faces = True
    config.embed_batch_size = 64

    # Fine-tuning, when num_train_steps is set above 0.
    config.num_train_steps = 0
    config.loss = "softmax"
    config.sampler = "class_balanced"
    config.images_per_class = 4
    config.global_batch_size = 32
    config.learning_rate = 1e-4
    config.backbone_lr_multiplier = 0.1
    config.warmup_steps = 0
    config.weight_decay = 1e-4
    config.augment.flip = True
    config.augment.max_rotation_degrees = 5.0
    config.augment.max_translation = 0.05
    config.augment.brightness = 0.1
    config.augment.contrast = 0.1
    config.log_every_steps = 20
    config.checkpoint_every_steps = 100
    return config
