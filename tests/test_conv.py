"""The oneDNN convolution custom calls against XLA's own convolution: values and gradients;
the one line that says which convolution a run uses, and a failed build tried only once."""

import logging
import os
import platform
import re
import stat
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretrieval.config import base_config
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models import build_model
from jaxretrieval.ops import conv

NHWC = ("NHWC", "HWIO", "NHWC")
# CI installs g++, pip installs oneDNN, and CI sets this: there the custom calls must be built.
REQUIRED = os.environ.get("JAXRETRIEVAL_REQUIRE_ONEDNN") == "1"


def cpu_has_winograd_kernels() -> bool:
    """oneDNN implements Winograd convolution for AVX-512 (avx512_core) CPUs only; elsewhere
    the custom calls fall back to the direct convolution."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags


LINUX_X86_64 = sys.platform == "linux" and platform.machine() == "x86_64"


@pytest.fixture
def onednn():
    path = conv.convolution_path()
    if not path.onednn:
        if REQUIRED:
            pytest.fail(f"the oneDNN convolution did not build or load: {path}")
        pytest.skip(f"oneDNN convolution unavailable here: {path}")


@pytest.fixture
def mode(monkeypatch):
    """Sets JAXRETRIEVAL_CPU_CONV for one test (the decision is made once per process)."""
    def set_mode(value):
        monkeypatch.setenv(conv.MODE_VARIABLE, value)
        conv.convolution_path.cache_clear()
    yield set_mode
    conv.convolution_path.cache_clear()


@pytest.fixture
def decisions(caplog):
    """Decides afresh and returns the path with the lines logged for it."""
    caplog.set_level(logging.INFO, logger="jaxretrieval")

    def decide():
        conv.convolution_path.cache_clear()
        caplog.clear()
        path = conv.convolution_path()
        conv.convolution_path()  # decided once: no second line
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("jaxretrieval")]
        return path, lines
    yield decide
    conv.convolution_path.cache_clear()


def loss_and_grads(conv_fn, x, w, padding):
    def loss(x, w):
        y = conv_fn(x, w, (1, 1), padding, dimension_numbers=NHWC)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.shape[-1]))  # a gradient that varies
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("shape, padding", [
    ((2, 9, 9, 3, 5), "VALID"),  # a 3-channel stem
    ((3, 8, 6, 4, 16), "SAME"),
    ((1, 7, 7, 2, 1), ((2, 0), (1, 3))),  # uneven explicit padding, one output channel
    ((4, 12, 12, 32, 64), "VALID"),  # blocked layouts on both sides
    ((2, 66, 66, 16, 32), "VALID"),  # 8,192 output pixels: Winograd, all three calls
])
def test_values_and_gradients_equal_xla(onednn, shape, padding):
    n, h, w_, c, o = shape
    x = jax.random.normal(jax.random.PRNGKey(0), (n, h, w_, c))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c, o)) / np.sqrt(9 * c)
    value, grads = loss_and_grads(conv.conv_general_dilated, x, w, padding)
    reference, reference_grads = loss_and_grads(jax.lax.conv_general_dilated, x, w, padding)
    np.testing.assert_allclose(value, reference, rtol=1e-4)  # a sum over many outputs
    for got, want in zip(grads, reference_grads):
        # float32 sums in another order: errors scale with the largest entry.
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    hlo = jax.jit(lambda x, w: conv.conv_general_dilated(
        x, w, (1, 1), padding, dimension_numbers=NHWC)).lower(x, w).as_text()
    assert "jaxretrieval_conv_forward" in hlo and "convolution" not in hlo


def test_what_onednn_does_not_cover_goes_to_xla(onednn):
    x = jnp.ones((1, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 2))
    for kwargs in (dict(window_strides=(2, 2)), dict(window_strides=(1, 1), rhs_dilation=(2, 2))):
        strides = kwargs.pop("window_strides")
        fn = lambda x, w: conv.conv_general_dilated(x, w, strides, "SAME",
                                                    dimension_numbers=NHWC, **kwargs)
        hlo = jax.jit(fn).lower(x, w).as_text()
        assert "convolution" in hlo and "jaxretrieval_conv" not in hlo
        np.testing.assert_allclose(jax.jit(fn)(x, w), jax.lax.conv_general_dilated(
            x, w, strides, "SAME", dimension_numbers=NHWC, **kwargs))
    bf16 = jax.jit(lambda x, w: conv.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=NHWC)).lower(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).as_text()
    assert "jaxretrieval_conv" not in bf16


def test_the_seed_model_trains_the_same_under_pmap_with_either_convolution(onednn, mode):
    config = base_config()
    config.image_size = 16
    model = build_model(config, bn_axis_name="d")
    images = jax.random.uniform(jax.random.PRNGKey(2), (4, 2, 16, 16, 1))
    variables = model.init(jax.random.PRNGKey(0), images[0], train=False)

    def grads(variables, images):
        def loss(params):
            out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 images, train=True, mutable=["batch_stats"])
            return jnp.sum(out[:, 0] * out[:, 1])
        return jax.lax.pmean(jax.grad(loss)(variables["params"]), "d")

    replicated = jax.tree.map(lambda v: jnp.stack([v] * 4), variables)
    results = {}
    for name in ("onednn", "xla"):
        mode(name)
        results[name] = jax.pmap(grads, axis_name="d")(replicated, images)
    for got, want in zip(jax.tree.leaves(results["onednn"]), jax.tree.leaves(results["xla"])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_xla_mode_uses_no_custom_call_and_a_bad_mode_is_refused(mode):
    mode("xla")
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2))
    hlo = jax.jit(lambda x, w: conv.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=NHWC)).lower(x, w).as_text()
    assert "jaxretrieval_conv" not in hlo and "convolution" in hlo
    mode("fastest")
    with pytest.raises(JaxRetrievalError, match="use one of auto, onednn, xla"):
        conv.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=NHWC)


def test_the_line_names_onednn_its_version_and_where_it_came_from(onednn, decisions):
    path, lines = decisions()
    install = conv.find_onednn()
    assert lines == [str(path)] and path.onednn
    # The version is the loaded library's own (3.x), the origin the pip package it is from.
    assert re.fullmatch(rf"convolutions: oneDNN 3\.\d+\.\d+ \(pip {install.distribution} "
                        rf"{re.escape(install.version)}, {re.escape(install.library_dir)}\)",
                        lines[0]), lines
    assert os.path.isfile(os.path.join(install.library_dir, "libdnnl.so"))


def test_the_line_says_why_xla(mode, decisions, monkeypatch):
    mode("xla")
    assert decisions() == (conv.ConvolutionPath(False, "XLA (JAXRETRIEVAL_CPU_CONV=xla)"),
                           ["convolutions: XLA (JAXRETRIEVAL_CPU_CONV=xla)"])
    mode("auto")
    monkeypatch.setattr(conv.platform, "machine", lambda: "aarch64")
    assert decisions()[1] == ["convolutions: XLA (not a Linux x86-64 CPU)"]
    monkeypatch.undo()
    if LINUX_X86_64:
        monkeypatch.setattr(conv, "PIP_ONEDNN", (("no-such-onednn", "no-such-onednn-devel"),))
        assert decisions()[1] == [
            "convolutions: XLA (oneDNN is not installed: pip install onednn onednn-devel)"]


@pytest.fixture
def fake_onednn(monkeypatch, tmp_path):
    """A pip oneDNN that is never read (the compiler below fails first), in a cache of
    its own."""
    if not LINUX_X86_64:
        pytest.skip("the oneDNN build is tried on Linux x86-64 only")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    install = conv.OnednnInstall("onednn", "0.0", str(tmp_path), str(tmp_path), None)
    monkeypatch.setattr(conv, "find_onednn", lambda: install)


def test_a_failed_build_is_one_line_recorded_once_and_not_tried_again(
        fake_onednn, mode, decisions, monkeypatch, tmp_path, capfd):
    calls = tmp_path / "calls"
    compiler = tmp_path / "failing-g++"
    compiler.write_text(f"#!/bin/sh\necho run >> {calls}\n"
                        "echo 'onednn_conv.cc:25:10: fatal error: dnnl.hpp: missing' >&2\n"
                        "echo 'compilation terminated.' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CXX", str(compiler))
    mode("auto")
    path, lines = decisions()
    assert calls.read_text().splitlines() == ["run"]
    records = list((tmp_path / "cache" / "jaxretrieval" / "ops").glob("*.failed.json"))
    log = records[0].with_name(records[0].name.replace(".failed.json", ".log"))
    assert len(records) == 1 and "compilation terminated." in log.read_text()
    assert lines == [str(path)] == [
        "convolutions: XLA (the oneDNN build failed: onednn_conv.cc:25:10: fatal error: "
        f"dnnl.hpp: missing; details in {log})"]
    assert not path.onednn
    # The next decision (the next run) reads the record instead of compiling again.
    assert decisions() == (path, lines)
    assert calls.read_text().splitlines() == ["run"]
    captured = capfd.readouterr()
    assert "compilation terminated" not in captured.out + captured.err
    # Required, the recorded failure is one clear error, still without compiling.
    mode("onednn")
    with pytest.raises(JaxRetrievalError, match="the oneDNN build failed: .*fatal error"):
        conv.convolution_path()
    assert calls.read_text().splitlines() == ["run"]


def test_onednn_mode_without_a_compiler_is_one_clear_error(fake_onednn, mode, decisions,
                                                          monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    mode("onednn")
    with pytest.raises(JaxRetrievalError, match="pip install onednn onednn-devel"):
        conv.convolution_path()
    mode("auto")  # the same failure in auto mode falls back to XLA
    assert decisions()[1] == [f"convolutions: XLA (CXX={tmp_path}/no-such-compiler not found)"]
    assert conv.onednn_available() is False


def test_under_shard_map_gradients_of_replicated_and_sharded_operands_equal_xla(onednn):
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.asarray(jax.local_devices()[:4]), ("d",))
    x = jax.random.normal(jax.random.PRNGKey(3), (8, 6, 6, 3))
    w = jax.random.normal(jax.random.PRNGKey(4), (3, 3, 3, 4))

    def grads(conv_fn):
        def loss(x, w):  # x sharded over "d", w replicated: its gradient sums over devices
            def local(x, w):
                y = conv_fn(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
                return jax.lax.psum(jnp.sum(jnp.sin(y)), "d")
            return jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P()), out_specs=P())(x, w)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

    for got, want in zip(grads(conv.conv_general_dilated), grads(jax.lax.conv_general_dilated)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def reference_block(x, w, b, padding):
    """The seed CNN's block in plain XLA: convolution, bias, ReLU, 2x2 max-pool."""
    y = jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC)
    return jax.lax.reduce_window(jax.nn.relu(y + b), -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                 (1, 2, 2, 1), "VALID")


def block_operands(shape, seed=0):
    n, h, w_, c, o = shape
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(keys[0], (n, h, w_, c))
    w = jax.random.normal(keys[1], (3, 3, c, o)) / np.sqrt(9 * c)
    return x, w, 0.1 * jax.random.normal(keys[2], (o,))


@pytest.mark.parametrize("winograd", ["1", "0"])
@pytest.mark.parametrize("shape, padding", [
    ((2, 13, 11, 3, 8), "VALID"),  # 3-channel stem, odd output rows and columns dropped
    ((2, 64, 64, 16, 32), "SAME"),  # channels in 16s, 8,192 pixels: Winograd when on
    ((2, 12, 9, 32, 16), "VALID"),
])
def test_fused_block_equals_xla_in_values_and_gradients(onednn, monkeypatch, winograd, shape,
                                                        padding):
    from jaxretrieval.models.cnn import max_pool_2x2

    monkeypatch.setenv(conv.WINOGRAD_VARIABLE, winograd)
    x, w, b = block_operands(shape)
    fused = jax.jit(lambda x, w, b: conv.conv_relu_pool(x, w, b, padding, max_pool_2x2))
    assert "jaxretrieval_conv_relu_pool" in fused.lower(x, w, b).as_text()
    want = reference_block(x, w, b, padding)
    got = fused(x, w, b)
    assert got.shape == want.shape
    # Winograd rounds differently from a direct convolution; both stay this close.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * np.abs(want).max())

    def loss(block):
        return lambda x, w, b: jnp.sum(jnp.sin(block(x, w, b)))
    grads = jax.jit(jax.grad(loss(lambda x, w, b: conv.conv_relu_pool(
        x, w, b, padding, max_pool_2x2)), argnums=(0, 1, 2)))(x, w, b)
    reference = jax.grad(loss(lambda x, w, b: reference_block(x, w, b, padding)),
                         argnums=(0, 1, 2))(x, w, b)
    for got, want in zip(grads, reference):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_fused_block_under_shard_map_and_a_bad_winograd_setting(onednn, monkeypatch):
    from jax.sharding import Mesh, PartitionSpec as P

    from jaxretrieval.models.cnn import max_pool_2x2

    mesh = Mesh(np.asarray(jax.local_devices()[:4]), ("d",))
    x, w, b = block_operands((8, 10, 10, 16, 16), seed=1)
    sharded = jax.jit(jax.shard_map(
        lambda x, w, b: conv.conv_relu_pool(x, w, b, "VALID", max_pool_2x2), mesh=mesh,
        in_specs=(P("d"), P(), P()), out_specs=P("d")))
    want = reference_block(x, w, b, "VALID")
    np.testing.assert_allclose(sharded(x, w, b), want, rtol=1e-4,
                               atol=2e-5 * np.abs(want).max())
    monkeypatch.setenv(conv.WINOGRAD_VARIABLE, "yes")
    with pytest.raises(JaxRetrievalError, match="use 1 \\(on\\) or 0 \\(off\\)"):
        conv.conv_relu_pool(x, w, b, "VALID", max_pool_2x2)


def test_the_seed_model_embeds_the_same_fused_or_not(onednn, mode):
    """Evaluated without BatchNorm, SeedCNN runs each block as one fused call; its
    parameters are nn.Conv's either way, so one checkpoint serves both."""
    config = base_config()
    config.image_size, config.channels = 40, 3
    config.model.batch_norm, config.model.padding, config.model.pooling = False, "VALID", "flatten"
    model = build_model(config)
    images = jax.random.uniform(jax.random.PRNGKey(5), (4, 40, 40, 3))
    variables = model.init(jax.random.PRNGKey(0), images[:1])
    assert set(variables["params"]["backbone"]) == {"Conv_0", "Conv_1", "Conv_2"}
    embed = jax.jit(model.apply)
    assert embed.lower(variables, images).as_text().count("jaxretrieval_conv_relu_pool") == 3
    fused = embed(variables, images)
    mode("xla")
    np.testing.assert_allclose(fused, jax.jit(model.apply)(variables, images), atol=1e-5)


@pytest.mark.parametrize("shape, uses_winograd", [
    ((2, 66, 66, 16, 32), True),
    ((2, 10, 10, 16, 32), False),  # too few output pixels to pay for the kernel transform
    ((2, 66, 66, 3, 32), False),  # 3 input channels
])
def test_winograd_runs_exactly_where_it_applies(onednn, monkeypatch, shape, uses_winograd):
    """Winograd rounds differently from the direct convolution: the switch changes the bits
    of both the training convolution and the fused block where Winograd applies, and
    nothing elsewhere (on a CPU without oneDNN's Winograd kernels, nowhere)."""
    uses_winograd = uses_winograd and cpu_has_winograd_kernels()
    from jaxretrieval.models.cnn import max_pool_2x2

    x, w, b = block_operands(shape, seed=2)
    outputs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(conv.WINOGRAD_VARIABLE, setting)
        outputs[setting] = (
            jax.jit(lambda x, w: conv.conv_general_dilated(
                x, w, (1, 1), "VALID", dimension_numbers=NHWC))(x, w),
            jax.jit(lambda x, w, b: conv.conv_relu_pool(x, w, b, "VALID", max_pool_2x2))(
                x, w, b))
    for on, off in zip(outputs["1"], outputs["0"]):
        assert np.array_equal(on, off) != uses_winograd
        np.testing.assert_allclose(on, off, rtol=1e-4, atol=2e-5 * np.abs(off).max())


def test_an_unwritable_cache_or_a_corrupt_record_falls_back_or_builds_again(
        fake_onednn, mode, decisions, monkeypatch, tmp_path):
    mode("auto")
    monkeypatch.setenv("CXX", "true")  # a "compiler" that succeeds and writes nothing
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    path, lines = decisions()
    assert lines == [f"convolutions: XLA (could not build in {conv.cache_dir()}: "
                     f"[Errno 20] Not a directory: '{blocker}/jaxretrieval')"]
    # A record that cannot be read is no record: the build is tried (and, writing no
    # library here, does not load).
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "false")
    decisions()
    (record,) = (tmp_path / "cache" / "jaxretrieval" / "ops").glob("*.failed.json")
    record.write_text("{not json")
    path, lines = decisions()
    assert "the oneDNN build failed: the compiler exited with status 1" in lines[0]
    assert record.read_text().startswith('{"detail"')
