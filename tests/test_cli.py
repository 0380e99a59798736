"""The command line's argument handling (jaxretrieval.cli) and the config it resolves
(jaxretrieval.config.resolve_config). Nothing here trains: every case fails or resolves
before the first step."""

import os

import pytest

from jaxretrieval import cli
from jaxretrieval.config import base_config, config_to_json, resolve_config
from jaxretrieval.errors import JaxRetrievalError


@pytest.fixture(autouse=True)
def no_compilation_cache(monkeypatch):
    # `cli.main` sets up the process; keep this test process's JAX config as it was.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


def test_overrides_split_from_the_other_arguments_in_both_forms():
    overrides, rest = cli.split_config_overrides(
        ["--workdir", "w", "--config.seed=3", "--config.model.widths", "(8, 16)",
         "--eval_only", "--config.loss=a=b"])
    assert overrides == [("seed", "3"), ("model.widths", "(8, 16)"), ("loss", "a=b")]
    assert rest == ["--workdir", "w", "--eval_only"]


def test_an_override_without_a_value_is_an_error(capsys, tmp_path):
    assert cli.main(["train", "--workdir", str(tmp_path / "wd"), "--config.seed"]) == 1
    assert "--config.seed needs a value: --config.seed=VALUE" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "wd")


@pytest.mark.parametrize("extra", [["--config", "configs/default.py"], ["--config.seed=1"]])
def test_eval_only_refuses_another_config(capsys, tmp_path, extra):
    code = cli.main(["train", "--eval_only", "--workdir", str(tmp_path / "wd"), *extra])
    assert code == 1
    assert "--eval_only evaluates the workdir's own run" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "wd")


@pytest.mark.parametrize("argv", [[], ["bogus"]])
def test_an_unknown_command_prints_the_usage_and_exits_2(capsys, argv):
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("usage: jaxretrieval {train,embed,index,search,")


def test_help_lists_the_commands_with_a_line_each_and_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command, text in cli.COMMANDS.items():
        assert f"  {command}" in out and text in out
    assert "python -m train|serve` only from the repository's root" in out


@pytest.mark.parametrize("prog, argv, expected", [
    ("jaxretrieval", ["train", "--help"],
     ["usage: jaxretrieval train", "(default runs/default)", "jaxretrieval config"]),
    ("python -m", ["train", "--help"], ["usage: python -m train"]),
    ("jaxretrieval", ["search", "--help"], ["usage: jaxretrieval search", "(default 10)",
                                            "--threshold THRESHOLD"]),
    ("python -m", ["serve", "--help"], ["usage: python -m serve", "(default 8000)"]),
])
def test_each_command_names_itself_and_its_defaults_in_help(capsys, prog, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv, prog=prog)
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in expected:
        assert text in out


def test_config_lists_every_key_with_its_default_and_meaning(capsys, config_file):
    from jaxretrieval.config import flat_keys

    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    listed = [line.split(" = ")[0] for line in out.splitlines()
              if line and not line.startswith("#")]
    assert listed and sorted(listed) == sorted(flat_keys(base_config()))
    assert "\nnum_train_steps = 600\n" in out
    assert "\ndata_dir = ''  # TFDS data directory" in out
    assert "\nmodel.widths = (32, 64, 128)  # read by model.name seed_cnn\n" in out
    assert "loss_options.triplet_margin = 0.2  # read by loss triplet" in out
    assert cli.main(["config", "--config", config_file]) == 0
    assert "\nseed = 7\n" in capsys.readouterr().out


def test_an_unknown_key_suggests_the_nearest_and_how_to_list_them(capsys, tmp_path):
    assert cli.main(["train", "--workdir", str(tmp_path / "wd"),
                     "--config.num_train_step=3"]) == 1
    err = capsys.readouterr().err
    assert "did you mean 'num_train_steps'?" in err and "jaxretrieval config" in err
    assert "embed_batch_size" not in err  # not the whole list
    assert not os.path.exists(tmp_path / "wd")


def test_a_port_in_use_is_one_error_line_before_serving(capsys, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli.main(["serve", "--workdir", str(tmp_path / "none"), "--port", str(port)])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.startswith(f"error: port {port} on 127.0.0.1 is in use")
    assert "pass --port" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "serving" not in captured.out


def test_a_second_writer_is_told_in_command_line_terms(capsys, tmp_path, monkeypatch):
    from jaxretrieval.errors import WriterBusyError
    from jaxretrieval.index.storage import WriterLock

    held = WriterLock(str(tmp_path))
    try:
        with pytest.raises(WriterBusyError, match=r"index\.close\(\)"):
            WriterLock(str(tmp_path))  # Python callers keep the Python wording
        monkeypatch.setattr(cli, "run_index", lambda argv, prog: WriterLock(str(tmp_path)))
        assert cli.main(["index"]) == 1
    finally:
        held.release()
    err = capsys.readouterr().err
    assert err.startswith(f"error: another process has the index at {tmp_path} open")
    assert "jaxretrieval serve" in err and "stop it, or wait" in err
    assert "index.close()" not in err


def test_progress_to_a_file_is_plain_lines_with_rate_and_eta(tmp_path):
    with open(tmp_path / "log.txt", "w") as stream:
        bar = cli.ProgressBar("step", stream=stream)
        for step in (20, 40, 60):
            bar.update_steps({"step": step, "total_steps": 60, "loss": 1.5,
                              "images_per_sec": float("nan") if step == 20 else 800.0})
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert "\r" not in (tmp_path / "log.txt").read_text()
    assert lines[0] == "step 20/60 loss 1.5000 images/s - ETA -"
    assert lines[1].startswith("step 40/60 loss 1.5000 images/s 800 ETA 0:00:0")
    assert lines[2] == "step 60/60 loss 1.5000 images/s 800 ETA 0:00:00"


@pytest.mark.parametrize("override, message", [
    ("--config.seed=abc", "seed"),
    ("--config.global_batch_size=0", "global_batch_size"),
    ("--config.no_such_key=1", "no_such_key"),
])
def test_a_bad_override_is_refused_before_anything_is_written(capsys, tmp_path, override,
                                                              message):
    assert cli.main(["train", "--workdir", str(tmp_path / "wd"), override]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not os.path.exists(tmp_path / "wd")


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "seven.py"
    path.write_text("from jaxretrieval.config import base_config\n\n"
                    "def get_config():\n"
                    "    config = base_config()\n"
                    "    config.seed = 7\n"
                    "    return config\n")
    return str(path)


@pytest.fixture
def trained_dir(tmp_path):
    """A workdir whose config.json says seed 3."""
    config = base_config()
    config.seed = 3
    path = tmp_path / "wd"
    path.mkdir()
    (path / "config.json").write_text(config_to_json(config))
    return str(path)


def test_resolve_config_prefers_the_file_then_the_workdir_then_the_default(
        tmp_path, config_file, trained_dir):
    assert base_config().seed not in (3, 7)
    assert resolve_config(config_file, trained_dir).seed == 7
    assert resolve_config(None, trained_dir).seed == 3
    assert resolve_config(None, str(tmp_path / "new")).seed == base_config().seed
    assert resolve_config(None, None).seed == base_config().seed
    # Overrides apply on top of whichever was chosen.
    for path in (config_file, None):
        assert resolve_config(path, trained_dir, [("seed", "11")]).seed == 11


def test_resolve_config_parses_overrides_like_their_defaults(trained_dir):
    config = resolve_config(None, trained_dir, [("model.widths", "(8, 16)"),
                                                ("learning_rate", "0.5")])
    assert config.model.widths == (8, 16) and config.learning_rate == 0.5


@pytest.mark.parametrize("key, value", [("seed", "abc"), ("global_batch_size", "-8"),
                                        ("nope", "1")])
def test_resolve_config_rejects_bad_overrides(trained_dir, key, value):
    with pytest.raises(JaxRetrievalError):
        resolve_config(None, trained_dir, [(key, value)])
