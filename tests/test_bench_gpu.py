"""bench/gpu.py runs on a GPU only in some sessions: its smoke mode keeps it working here."""

import json
import os
import subprocess
import sys

from conftest import REPO


def run(*args):
    """`python -m bench.gpu ARGS` from the repository root, on one CPU device."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "bench.gpu", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_gpu_benchmark_measures_writes_a_checkpoint_and_checks_it_on_cpu(tmp_path):
    # A model that does not exist fails its own part; the other parts still report.
    # With the end-to-end figure from a folder of JPEGs through the grain pipeline, a
    # profile of the step, and one sweep candidate in its own process.
    result = run("--out", tmp_path, "--smoke", "--models", "seed_cnn,vgg", "--dtypes",
                 "bfloat16", "--batch", "8", "--steps", "1", "--repeats", "1", "--e2e",
                 "--jpeg_folder", tmp_path / "jpegs", "--jpeg_images", "16", "--e2e_steps",
                 "1", "--workers", "1", "--profile", "1", "--sweep", "bn_bf16_reductions")
    assert result.returncode != 0 and "failed: vgg bfloat16" in result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    with open(tmp_path / "gpu_bench.json") as f:
        assert json.load(f) == report
    assert list(report["errors"]) == ["vgg bfloat16"]
    assert "unknown model 'vgg'" in report["errors"]["vgg bfloat16"]
    (measured,) = report["results"]
    assert measured["dtype"] == "bfloat16" and measured["train_images_per_sec"] > 0
    # The smoke model's two 3x3 convolutions alone: 30x30x8 outputs of 27 multiply-adds,
    # 13x13x16 of 72; the count must hold them (a GPU's compiled program's did not).
    conv_flops = 2 * (30 * 30 * 8 * 27 + 13 * 13 * 16 * 72)
    assert measured["forward_flops_per_image"] >= conv_flops
    train_flops_per_sec = 3 * measured["forward_flops_per_image"] * measured[
        "train_images_per_sec"]
    assert abs(measured["train_tflops_per_sec"] * 1e12 / train_flops_per_sec - 1) < 1e-9
    assert measured["train_mfu"] is None  # no known peak for a CPU
    assert measured["e2e_train_images_per_sec"] > 0 and measured["e2e_workers"] == 1
    assert measured["e2e_images"] == 16 and measured["e2e_over_synthetic"] > 0
    assert measured["profile"]["traced_steps"] == 1
    assert measured["profile"]["device_plane"] is None  # a CPU: the host's threads instead
    assert measured["profile"]["busiest_host_lines_ms"]
    (candidate,) = report["sweep"]
    assert candidate["variant"] == "bn_bf16_reductions" and "error" not in candidate
    assert candidate["train_images_per_sec"] > 0 and candidate["batch"] == 8
    assert os.path.isfile(tmp_path / "gpu_workdir.tar.gz")

    check = run("--check", tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
    checked = json.loads(check.stdout.strip().splitlines()[-1])
    assert checked["dtype"] == "bfloat16" and checked["checkpoint_step"] == 4
    assert checked["min_cosine"] > 0.999
