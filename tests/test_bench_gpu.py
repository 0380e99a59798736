"""bench/gpu.py runs on a GPU only in some sessions: its smoke mode keeps it working here."""

import json
import os

from conftest import run_python

SCRIPT = os.path.join("bench", "gpu.py")


def test_the_gpu_benchmark_measures_writes_a_checkpoint_and_checks_it_on_cpu(tmp_path):
    run = ("import runpy, sys\n"
           f"sys.argv = [{SCRIPT!r}] + sys.argv[1:]\n"
           f"runpy.run_path({SCRIPT!r}, run_name='__main__')\n")
    result = run_python(run, "--out", tmp_path, "--smoke", "--models", "seed_cnn",
                        "--dtypes", "bfloat16", "--batch", "8", "--steps", "1",
                        "--repeats", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    (measured,) = report["results"]
    assert measured["dtype"] == "bfloat16" and measured["train_images_per_sec"] > 0
    assert measured["train_step_flops"] > measured["embed_flops"] > 0
    assert measured["train_mfu"] is None  # no known peak for a CPU
    assert os.path.isfile(tmp_path / "gpu_workdir.tar.gz")

    check = run_python(run, "--check", tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
    checked = json.loads(check.stdout.strip().splitlines()[-1])
    assert checked["dtype"] == "bfloat16" and checked["checkpoint_step"] == 4
    assert checked["min_cosine"] > 0.999
