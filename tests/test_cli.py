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


@pytest.mark.parametrize("argv", [[], ["bogus"], ["--help"]])
def test_an_unknown_command_prints_the_usage_and_exits_2(capsys, argv):
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("usage: jaxretrieval {train,embed,index,search,")


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
