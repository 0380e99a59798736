"""Orbax checkpoints of the train state, restorable on any machine and device count.

The state is saved as one host copy (not per device), so a checkpoint written on 4 devices
restores on 1, or on a machine without the accelerator it was trained on.
"""

import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxretrieval.errors import JaxRetrievalError

logger = logging.getLogger(__name__)


class _QuietReadOnlyOpen(logging.Filter):
    """Drops Orbax's warning that a directory opened read-only is read-only: it is asked for
    on every load of a Retriever, an export or an evaluation, and says nothing wrong."""

    def filter(self, record):
        return record.msg != "Given directory is read only=%s"


# Orbax logs through absl, which logs to the standard logger "absl".
logging.getLogger("absl").addFilter(_QuietReadOnlyOpen())


class CheckpointStore:
    """Saves every `every_steps` steps (asynchronously), keeps the last `keep`."""

    def __init__(self, directory: str, *, every_steps: int = 1, keep: int = 3,
                 asynchronous: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.every_steps = every_steps
        if read_only:
            # save_interval_steps=0: what Orbax sets (with a warning) for a read-only store.
            options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                   save_interval_steps=0,
                                                   enable_async_checkpointing=False)
        else:
            options = ocp.CheckpointManagerOptions(
                save_interval_steps=every_steps, max_to_keep=keep,
                enable_async_checkpointing=asynchronous)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether `step` is due for a save: every `every_steps` steps (never step 1 for free,
        as Orbax's default policy would)."""
        return step % self.every_steps == 0

    def save(self, step: int, state) -> None:
        """Starts saving host pytree `state` at `step`, in the background."""
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, step: int | None = None, target=None):
        """The state at `step` (default: latest), shaped like `target` when given."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise JaxRetrievalError(
                f"no checkpoint in {self.directory}: train first with python -m train")
        args = ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
        restored = _to_host(self._manager.restore(step, args=args))
        if target is not None:
            # Orbax restores what was saved even when the target's shapes differ; a mismatch
            # means the checkpoint belongs to another model.
            for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(target)[0],
                                         jax.tree.leaves(restored)):
                if np.shape(want) != np.shape(got):
                    raise JaxRetrievalError(
                        f"the checkpoint at step {step} in {self.directory} does not fit this "
                        f"model ({jax.tree_util.keystr(path)}: {np.shape(got)} saved, "
                        f"{np.shape(want)} expected); train in a new workdir")
        return restored

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _to_host(tree):
    return jax.tree.map(np.asarray, tree)


def latest_checkpoint_step(directory: str) -> int | None:
    """The step of the latest checkpoint in `directory`; None when it has none (or does not
    exist). Reads only: nothing is created."""
    if not os.path.isdir(directory):
        return None
    with CheckpointStore(directory, read_only=True, asynchronous=False) as store:
        return store.latest_step()


def open_for_reading(workdir: str) -> CheckpointStore:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise JaxRetrievalError(
            f"no checkpoints in {workdir!r}: train into it first with "
            f"`python -m train --workdir {workdir}`")
    logger.debug("reading checkpoints from %s", directory)
    return CheckpointStore(directory, read_only=True, asynchronous=False)
