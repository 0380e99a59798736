"""Stage outputs inside a backbone, marked for explanations.

Each backbone passes the output of each of its stages (every group of blocks that shares a
resolution, and the stem when it has one) through `stage_output`, named `stage<k>` in the
order they run: `stage0` is the stem, `stage1` the first group of blocks. Outside an
explanation this returns the feature map unchanged and stores nothing. An explanation
(`jaxretrieval.explain`) uses it in two ways: applied with the `intermediates` collection
mutable, a model records every stage's feature map there under the stage's name (which gives
the stages' shapes); and given a weight per spatial position in the `explain` collection
under the stage's name, the model multiplies that stage's feature map by it, so the gradient
of a result with respect to weights of 1 is each position's gradient x activation at that
stage, summed over channels.
"""

import jax.numpy as jnp

# The variable collection of the per-position weights (the model's final feature map's are
# there too, under `position_weights`).
EXPLAIN_COLLECTION = "explain"
# Where the stages' feature maps are recorded: Flax's `init` never keeps this collection,
# so recording them cannot add variables to a checkpoint.
STAGE_COLLECTION = "intermediates"


def stage_number(name: str) -> int:
    """k of a stage named `stage<k>`: the stages' order (a collection's keys come sorted as
    text, which puts stage10 before stage2)."""
    return int(name[len("stage"):])


def stage_output(module, name: str, x):
    """`x`, the output of the stage `name` of `module` (a backbone): recorded, and weighted
    per position when the `explain` collection holds weights [B, H, W] for it."""
    module.sow(STAGE_COLLECTION, name, x)
    if module.has_variable(EXPLAIN_COLLECTION, name):
        weights = module.get_variable(EXPLAIN_COLLECTION, name)
        x = x * jnp.asarray(weights)[..., None].astype(x.dtype)
    return x
