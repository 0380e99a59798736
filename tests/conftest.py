"""Shared fixtures. Four fake CPU devices for the whole session, set before JAX starts."""

import os
import subprocess
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YALEFACES = os.path.abspath(os.path.join(REPO, "..", "shared", "data", "yalefaces"))


def tiny_config(data_dir, **overrides):
    """A digits run that trains in seconds: 16x16 inputs, two narrow conv stages."""
    from jaxretrieval.config import base_config

    config = base_config()
    config.data_dir = str(data_dir)
    config.image_size = 16
    config.model.widths = (8, 16)
    config.embedding_dim = 16
    config.global_batch_size = 32
    config.num_train_steps = 8
    config.warmup_steps = 2
    config.log_every_steps = 2
    config.checkpoint_every_steps = 4
    config.embed_batch_size = 64
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split("__")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data directory holding the digits dataset, prepared once per session."""
    from jaxretrieval.data.sources import prepare_digits_tfds

    path = tmp_path_factory.mktemp("tfds")
    prepare_digits_tfds(str(path))
    return path


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, data_dir):
    """A workdir trained on 4 devices, evaluated and indexed (the whole default flow)."""
    from jaxretrieval.training import train_and_evaluate

    workdir = tmp_path_factory.mktemp("run") / "wd"
    metrics = train_and_evaluate(tiny_config(data_dir), str(workdir))
    return str(workdir), metrics


def run_python(code, *args, devices=1, timeout=300):
    """Runs `code` in a fresh Python process with `devices` fake CPU devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
