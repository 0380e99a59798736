"""torchvision and timm ResNet files imported into the Flax ResNet: the features are torch's.

The exactness checks always run against a reference ResNet written here in torch, with
torchvision's module and parameter names and architecture, saved as torch.save does and as
safetensors. Where torchvision and timm import, their own ResNets are checked the same way;
without them those tests skip, and fail instead when JAXRETRIEVAL_REQUIRE_TORCHVISION is set.
"""

import functools
import importlib.util
import os
import sys

import jax
import numpy as np
import pytest

from jaxretrieval.config import base_config
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models import torch_import
from jaxretrieval.models.resnet import resnet

REQUIRE = os.environ.get("JAXRETRIEVAL_REQUIRE_TORCHVISION") == "1"
if importlib.util.find_spec("torch") is None and not REQUIRE:
    pytest.skip('torch is not installed (pip install -e ".[test]")', allow_module_level=True)
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402


def _importable(name):
    try:
        __import__(name)
    except Exception:  # noqa: BLE001 - torchvision beside a mismatched torch fails on import
        return False
    return True


HAVE_TORCHVISION = _importable("torchvision")
HAVE_TIMM = HAVE_TORCHVISION and importlib.util.find_spec("timm") is not None
needs_torchvision = pytest.mark.skipif(
    not HAVE_TORCHVISION and not REQUIRE,
    reason="torchvision does not import here (pip install torch torchvision of one release)")
needs_timm = pytest.mark.skipif(
    not HAVE_TIMM and not REQUIRE, reason="timm is not installed (pip install timm)")

# Two inputs per model: ImageNet's 224x224 and a non-square one whose sides are odd at some
# stage, where padding and the strided convs' sampling grid differ if anything is off.
SHAPES = [(224, 224), (161, 98)]


# --- A reference ResNet in torch with torchvision's names ------------------------------

class Basic(torch.nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample(inplanes, planes, stride, self.expansion)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(torch.nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample(inplanes, planes, stride, self.expansion)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))


def downsample(inplanes, planes, stride, expansion):
    if stride == 1 and inplanes == planes * expansion:
        return None
    return torch.nn.Sequential(
        torch.nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False),
        torch.nn.BatchNorm2d(planes * expansion))


class ReferenceResNet(torch.nn.Module):
    def __init__(self, block, layers, width=64):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width
        for stage, count in enumerate(layers):
            planes = width * 2 ** stage
            blocks = []
            for index in range(count):
                blocks.append(block(inplanes, planes, 2 if stage and not index else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(inplanes, 10)

    def forward_features(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def reference(name, width=64):
    stages, block = {"resnet18": ((2, 2, 2, 2), Basic),
                     "resnet50": ((3, 4, 6, 3), Bottleneck)}[name]
    return ReferenceResNet(block, stages, width)


def randomised(model, seed):
    """Seeded random weights and BatchNorm statistics far from their init, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                shape = module.weight.shape
                module.weight.copy_(0.5 + torch.rand(shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(shape, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
    return model.eval()


# --- Helpers ------------------------------------------------------------------------------

def save_pth(model, path):
    torch.save(model.state_dict(), path)
    return str(path)


def save_safetensors(model, path):
    save_file({name: t.detach().numpy().copy() for name, t in model.state_dict().items()},
              str(path))
    return str(path)


def configured(path):
    """The default config with the keys the file decides (those this config has)."""
    config = base_config()
    for key, value in torch_import.decided_keys(path).items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        if leaf in node:
            node[leaf] = value
    return config


@functools.lru_cache(maxsize=None)
def compiled_resnet(name, num_filters):
    """One compiled forward pass per network, shared by the reference, torchvision and timm
    checks: compiling ResNet-50 takes longer than running it."""
    return jax.jit(resnet(name, num_filters=num_filters, small_stem=False).apply)


def flax_features(path, images_nchw):
    """(pre-pool feature map NCHW, pooled) of the imported backbone on torch's input."""
    config = configured(path)
    loaded = torch_import.load(path, config)
    variables = {"params": loaded["params"]["backbone"],
                 "batch_stats": loaded["batch_stats"]["backbone"]}
    x = np.transpose(images_nchw, (0, 2, 3, 1))
    feature_map = np.asarray(compiled_resnet(config.model.name, config.model.num_filters)(
        variables, x))
    return np.transpose(feature_map, (0, 3, 1, 2)), feature_map.mean(axis=(1, 2))


def torch_features(features_fn, images_nchw):
    with torch.no_grad():
        feature_map = features_fn(torch.from_numpy(images_nchw)).numpy()
    return feature_map, feature_map.mean(axis=(2, 3))


def assert_close(got, want, what):
    """Equal within 1e-4 of the reference tensor's largest magnitude."""
    assert got.shape == want.shape, what
    scale = float(np.abs(want).max())
    assert scale > 0, what
    error = float(np.abs(got - want).max())
    assert error <= 1e-4 * scale, f"{what}: max error {error:.3g} vs scale {scale:.3g}"


def check_exact(features_fn, path, height, width):
    images = np.random.default_rng(height).normal(size=(2, 3, height, width)).astype(np.float32)
    want_map, want_pooled = torch_features(features_fn, images)
    got_map, got_pooled = flax_features(path, images)
    assert_close(got_map, want_map, f"{path} feature map at {height}x{width}")
    assert_close(got_pooled, want_pooled, f"{path} pooled at {height}x{width}")


# --- Exactness ----------------------------------------------------------------------------

@pytest.mark.parametrize("height, width", SHAPES)
@pytest.mark.parametrize("name, save", [("resnet18", save_pth), ("resnet50", save_safetensors)])
def test_reference_resnet_features_equal_torch(tmp_path, name, save, height, width):
    model = randomised(reference(name), seed=1)
    path = save(model, tmp_path / f"{name}.weights")
    check_exact(model.forward_features, path, height, width)


def test_both_file_kinds_give_the_same_variables(tmp_path):
    model = randomised(reference("resnet18", width=8), seed=2)
    config = configured(save_pth(model, tmp_path / "r.pth"))
    from_pth = torch_import.load(str(tmp_path / "r.pth"), config)
    from_st = torch_import.load(save_safetensors(model, tmp_path / "r.safetensors"), config)
    jax.tree.map(np.testing.assert_array_equal, from_pth, from_st)
    # torch.save's format before the zip one, as torchvision's oldest files have it.
    legacy = str(tmp_path / "legacy.pth")
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert torch_import.sniff_torchvision(legacy)
    jax.tree.map(np.testing.assert_array_equal, from_pth, torch_import.load(legacy, config))
    assert set(from_pth) == {"params", "batch_stats"}
    assert set(from_pth["params"]) == {"backbone"}  # the head starts fresh
    kernel = from_pth["params"]["backbone"]["stage2_block1"]["conv1"]["kernel"]
    np.testing.assert_array_equal(  # OIHW -> HWIO
        kernel, model.layer2[0].conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(from_pth["batch_stats"]["backbone"]["stem_bn"]["var"],
                                  model.bn1.running_var.numpy())


def torchvision_resnet(name, seed):
    import torchvision

    return randomised(getattr(torchvision.models, name)(weights=None), seed)


def timm_resnet(name, seed):
    import timm

    return randomised(timm.create_model(name, pretrained=False), seed)


def timm_features(model):
    return model.forward_features


def torchvision_features(model):
    return torch.nn.Sequential(*list(model.children())[:-2])  # less avgpool and fc


@needs_torchvision
@pytest.mark.parametrize("height, width", SHAPES)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnet_features_equal_torch(tmp_path, name, height, width):
    model = torchvision_resnet(name, seed=3)
    path = save_pth(model, tmp_path / f"{name}.pth")
    check_exact(torchvision_features(model), path, height, width)


@needs_timm
@pytest.mark.parametrize("height, width", SHAPES)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_resnet_features_equal_torch(tmp_path, name, height, width):
    model = timm_resnet(name, seed=4)
    path = save_safetensors(model, tmp_path / "model.safetensors")
    check_exact(timm_features(model), path, height, width)


# --- What the file decides, and recognising it --------------------------------------------

@pytest.mark.parametrize("name, blocks, bottleneck", [
    ("resnet18", (2, 2, 2, 2), False), ("resnet34", (3, 4, 6, 3), False),
    ("resnet50", (3, 4, 6, 3), True), ("resnet101", (3, 4, 23, 3), True),
    ("resnet152", (3, 8, 36, 3), True)])
def test_depth_comes_from_the_tensors(tmp_path, name, blocks, bottleneck):
    model = ReferenceResNet(Bottleneck if bottleneck else Basic, blocks, width=4)
    path = save_safetensors(model, tmp_path / "w.safetensors")
    keys = torch_import.decided_keys(path)
    assert keys["model.name"] == name
    assert keys["model.num_filters"] == 4 and keys["channels"] == 3
    assert keys["model.small_stem"] is False
    assert keys["model.input_norm"] == "imagenet" and keys["model.crop_fraction"] == 0.875
    assert "image_size" not in keys  # any size runs; the recipes choose 224


@pytest.fixture
def tiny(tmp_path):
    """A narrow ResNet-18 and its torch.save file."""
    model = randomised(reference("resnet18", width=4), seed=5)
    return model, save_pth(model, tmp_path / "tiny.pth")


def test_sniff_tells_the_formats_apart(tmp_path, tiny):
    model, pth = tiny
    safetensors = save_safetensors(model, tmp_path / "tiny.safetensors")
    for path in (pth, safetensors):
        assert torch_import.sniff_torchvision(path)
        assert not torch_import.sniff_timm(path)  # plain ResNets load as torchvision's
    deep_stem = {"conv1.0.weight": np.zeros((32, 3, 3, 3), np.float32),
                 "layer1.0.conv1.weight": np.zeros((4, 64, 3, 3), np.float32)}
    save_file(deep_stem, str(tmp_path / "d.safetensors"))
    assert torch_import.sniff_timm(str(tmp_path / "d.safetensors"))
    assert not torch_import.sniff_torchvision(str(tmp_path / "d.safetensors"))
    with pytest.raises(JaxRetrievalError, match="deep stem"):
        torch_import.decided_keys(str(tmp_path / "d.safetensors"))

    other = tmp_path / "image.png"
    other.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    vit = save_file({"cls_token": np.zeros((1, 1, 8), np.float32)}, str(tmp_path / "v.st"))
    assert vit is None
    for path in (other, tmp_path / "v.st", tmp_path / "absent.pth"):
        assert not torch_import.sniff_torchvision(str(path))
        assert not torch_import.sniff_timm(str(path))


def test_wrapped_and_data_parallel_state_dicts_load(tmp_path, tiny):
    model, pth = tiny
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
               "epoch": 3}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    config = configured(pth)
    jax.tree.map(np.testing.assert_array_equal, torch_import.load(pth, config),
                 torch_import.load(str(tmp_path / "wrapped.pth"), config))
    assert torch_import.sniff_torchvision(str(tmp_path / "wrapped.pth"))
    save_file({f"module.{k}": v.numpy().copy() for k, v in model.state_dict().items()},
              str(tmp_path / "wrapped.safetensors"))
    assert torch_import.sniff_torchvision(str(tmp_path / "wrapped.safetensors"))
    assert torch_import.decided_keys(str(tmp_path / "wrapped.safetensors")) == \
        torch_import.decided_keys(pth)


# --- Errors -------------------------------------------------------------------------------

def truncate(path, keep):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


@pytest.mark.parametrize("save", [save_pth, save_safetensors])
def test_a_truncated_file_says_so(tmp_path, save):
    model = randomised(reference("resnet18", width=4), seed=6)
    path = save(model, tmp_path / "w.bin")
    truncate(path, 0.6)
    with pytest.raises(JaxRetrievalError, match="truncated"):
        torch_import.load(path, base_config())
    assert torch_import.sniff_torchvision(path)  # claimed, so that load says why


def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not weights at all")
    with pytest.raises(JaxRetrievalError, match=r"neither a PyTorch checkpoint \(torch"):
        torch_import.load(str(path), base_config())
    torch.save({"lr": 0.1, "epoch": 3}, tmp_path / "opt.pth")
    with pytest.raises(JaxRetrievalError, match="not a state_dict of tensors"):
        torch_import.load(str(tmp_path / "opt.pth"), base_config())
    torch.save({"conv.weight": torch.zeros(2, 3, 3, 3)}, tmp_path / "conv.pth")
    with pytest.raises(JaxRetrievalError, match="not a ResNet state_dict"):
        torch_import.load(str(tmp_path / "conv.pth"), base_config())


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path, tiny):
    model, pth = tiny
    config = configured(pth)
    tensors = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    tensors["layer2.1.conv1.weight"] = np.zeros((8, 8, 1, 3), np.float32)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(JaxRetrievalError,
                       match=r"layer2\.1\.conv1\.weight has shape \(8, 8, 1, 3\).*"
                             r"needs \(8, 8, 3, 3\)"):
        torch_import.load(str(tmp_path / "bad.safetensors"), config)


def test_missing_and_unexpected_tensors_are_listed(tmp_path, tiny):
    model, pth = tiny
    config = configured(pth)
    tensors = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    del tensors["layer3.0.bn2.running_var"], tensors["layer1.1.conv2.weight"]
    tensors["layer1.0.se.fc1.weight"] = np.zeros((2, 4), np.float32)
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    with pytest.raises(JaxRetrievalError) as err:
        torch_import.load(str(tmp_path / "odd.safetensors"), config)
    message = str(err.value)
    assert "2 missing" in message and "stage3_block1/bn2/var" in message
    assert "stage1_block2/conv2/kernel" in message
    assert "1 unexpected" in message and "layer1.0.se.fc1.weight" in message


def test_a_config_for_another_network_is_refused(tiny):
    _, pth = tiny
    config = configured(pth)
    config.model.name = "resnet50"
    with pytest.raises(JaxRetrievalError, match="holds a resnet18 with model.name='resnet18'"):
        torch_import.load(pth, config)


def test_without_torch_a_pth_file_asks_for_it(monkeypatch, tiny):
    _, pth = tiny
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(JaxRetrievalError, match="pip install torch"):
        torch_import.load(pth, base_config())


@needs_timm
def test_timm_variants_are_recognised_and_refused(tmp_path):
    import timm

    plain = save_safetensors(timm.create_model("resnet18"), tmp_path / "plain.safetensors")
    assert torch_import.sniff_torchvision(plain) and not torch_import.sniff_timm(plain)
    path = save_safetensors(timm.create_model("resnet18d"), tmp_path / "d.safetensors")
    assert torch_import.sniff_timm(path) and not torch_import.sniff_torchvision(path)
    with pytest.raises(JaxRetrievalError, match="deep stem"):
        torch_import.load(path, base_config())


def test_a_run_from_an_imported_file_trains_resumes_and_exports(tmp_path, tiny, data_dir):
    from conftest import tiny_config
    from jaxretrieval.checkpoint import CheckpointStore
    from jaxretrieval.retriever import Retriever
    from jaxretrieval.training import train, train_and_evaluate
    from jaxretrieval.workdir import Workdir

    model, pth = tiny
    config = tiny_config(data_dir, init_from=pth, num_train_steps=2, checkpoint_every_steps=2,
                         backbone_lr_multiplier=0.0, freeze_batch_norm=True)
    workdir = str(tmp_path / "wd")
    train(config, workdir)
    config.num_train_steps = 4  # resumes from step 2, not from the file
    metrics = train_and_evaluate(config, workdir)
    saved = Workdir(workdir).read_config()
    assert (saved.model.name, saved.model.input_norm, saved.channels) == ("resnet18",
                                                                          "imagenet", 3)
    with CheckpointStore(Workdir(workdir).checkpoints, read_only=True) as store:
        assert store.latest_step() == 4
        state = store.restore()
    # Multiplier 0 and frozen statistics: after 4 steps the backbone is still the file's.
    expected = torch_import.load(pth, saved)
    for got, want in zip(jax.tree.leaves(state["params"]["model"]["backbone"]),
                         jax.tree.leaves(expected["params"]["backbone"])):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    for got, want in zip(jax.tree.leaves(state["batch_stats"]["backbone"]),
                         jax.tree.leaves(expected["batch_stats"]["backbone"])):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert metrics["checkpoint_step"] == 4
    keys, _ = Retriever.load(workdir).search([np.zeros((8, 8), np.uint8)], k=3)
    assert len(keys[0]) == 3
