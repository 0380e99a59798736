"""The process set-up the library applies (jaxretrieval.runtime): one CPU device per core,
chosen even when JAX is already imported, the compilation cache, and the user's own
choices winning over both. Each case runs in a fresh process: this one's JAX has started."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from jaxretrieval import runtime

# What the user could have set, and what conftest sets for this test process.
USER_SETTINGS = ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_COMPILATION_CACHE_DIR",
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "XDG_CACHE_HOME")


def fresh_env(tmp_path, **settings):
    """This process's environment without the user's JAX settings; the cache goes under
    tmp_path unless told otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), TF_CPP_MIN_LOG_LEVEL="2")
    env.update(settings)
    return env


def run_fresh(code, env):
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("batch, cores, count", [
    (32, 2, 2),    # one per core
    (32, 16, 4),   # each device keeps 8 images of the batch
    (48, 5, 4),    # the largest count <= 5 that divides 48
    (64, 3, 2),
    (8, 4, 1),
    (1, 4, 1),
    (100, 1, 1),
])
def test_one_device_per_core_while_each_gets_eight_images(batch, cores, count):
    assert runtime.cpu_device_count(batch, cores) == count


PROBE = """
import json, jax
from jaxretrieval import runtime
chosen = runtime.use_one_cpu_device_per_core({batch})
print(json.dumps({{"chosen": chosen, "devices": jax.device_count(),
                  "cores": runtime.available_cores()}}))
"""


def test_the_count_is_chosen_after_jax_is_imported_before_it_starts(tmp_path):
    out = run_fresh(PROBE.format(batch=64), fresh_env(tmp_path))
    expected = runtime.cpu_device_count(64, out["cores"])
    assert out["chosen"] == expected and out["devices"] == expected


@pytest.mark.parametrize("setting", [
    {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"},
    {"JAX_NUM_CPU_DEVICES": "3"},
])
def test_a_count_the_user_set_wins(tmp_path, setting):
    out = run_fresh(PROBE.format(batch=64), fresh_env(tmp_path, **setting))
    assert out == dict(out, chosen=None, devices=3)


def test_after_jax_has_started_the_count_is_left_as_it_is(tmp_path):
    code = ("import json, jax\n"
            "from jaxretrieval import runtime\n"
            "before = jax.device_count()\n"
            "chosen = runtime.use_one_cpu_device_per_core(64)\n"
            "print(json.dumps({'before': before, 'chosen': chosen, "
            "'after': jax.device_count()}))\n")
    out = run_fresh(code, fresh_env(tmp_path))
    assert out == {"before": 1, "chosen": None, "after": 1}


CACHE_PROBE = ("import json, jax\n"
               "from jaxretrieval import runtime\n"
               "runtime.setup()\n"
               "print(json.dumps([jax.config.jax_compilation_cache_dir, "
               "jax.config.jax_persistent_cache_min_compile_time_secs]))\n")


def test_the_compilation_cache_defaults_moves_and_turns_off(tmp_path):
    default = run_fresh(CACHE_PROBE, fresh_env(tmp_path))
    assert default == [str(tmp_path / "cache" / "jaxretrieval" / "xla"), 0.5]
    moved = run_fresh(CACHE_PROBE, fresh_env(tmp_path, JAX_COMPILATION_CACHE_DIR="/x/y"))
    assert moved == ["/x/y", 0.5]
    off = run_fresh(CACHE_PROBE, fresh_env(tmp_path, JAX_COMPILATION_CACHE_DIR=""))
    assert off[0] == ""
    threshold = run_fresh(CACHE_PROBE, fresh_env(
        tmp_path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="2"))
    assert threshold[1] == 2


def test_python_m_train_uses_one_device_per_core_and_the_cache(tmp_path, data_dir):
    """The command line as a user runs it: no XLA_FLAGS in its environment."""
    env = fresh_env(tmp_path)
    workdir = tmp_path / "wd"
    result = subprocess.run(
        [sys.executable, "-m", "train", "--workdir", str(workdir),
         "--config.data_dir", str(data_dir),  # the `--config.KEY VALUE` form
         "--config.num_train_steps=2", "--config.warmup_steps=1",
         "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
         "--config.image_size=16", "--config.model.widths=(8, 16)",
         "--config.embedding_dim=16", "--config.global_batch_size=32",
         "--config.embed_batch_size=64"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    count = runtime.cpu_device_count(32, runtime.available_cores())
    assert f"training on {count} cpu device(s) in 1 process(es)" in result.stderr
    assert f"on {count} device(s)" in result.stderr  # the embedding export's
    assert "retrieval on digits" in result.stdout
    assert os.listdir(tmp_path / "cache" / "jaxretrieval" / "xla")
