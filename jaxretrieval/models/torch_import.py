"""torchvision's and timm's ResNet weights, read into the Flax ResNet of `models/resnet.py`.

Two file kinds hold a PyTorch `state_dict`:

- a PyTorch checkpoint (`torch.save(model.state_dict(), path)`: torchvision's `.pth` files,
  timm's `pytorch_model.bin`), read with `torch.load(weights_only=True)`, which executes no
  code from the file; it needs torch installed;
- a `.safetensors` file (timm's `model.safetensors` on the Hugging Face hub), read with the
  `safetensors` package's numpy loader; no torch needed.

Plain ResNets (18, 34, 50, 101, 152) have the same names in torchvision and in timm
(`conv1`, `bn1`, `layer1.0.conv1`, ..., `downsample.0` and `.1` for the projection, `fc`), and
the same architecture (v1.5, the 7x7/2 stem and the 3x3/2 max-pool), so one table of names
(`MODULES`, `LEAVES`) maps both onto the Flax variables. The depth comes from the tensors
themselves: the blocks per stage and whether the blocks have a third conv (a bottleneck).
timm's variants with a deep stem (`conv1.0`, ... in resnet*d, *c, *s, *t) or an average-pool
shortcut (`downsample.1` a conv, `downsample.2` its BatchNorm) are recognised and refused.

The three functions per format that `models/pretrained.py` registers are `sniff_*`
(is this file mine), `decided_keys` (the config keys the file fixes) and `load` (the
backbone's variables). The classifier (`fc`) is not read: the retrieval head starts fresh.
"""

import dataclasses
import io
import json
import os
import pickle
import pickletools
import re
import zipfile

import numpy as np

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models.resnet import RESNET_DEPTHS, resnet

# torch.save's zip format, and the legacy format that opens with torch's magic number
# pickled at protocol 2 (older torchvision files).
TORCH_ZIP_MAGIC = b"PK\x03\x04"
TORCH_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
# A safetensors file opens with its JSON header's length (little-endian u64), then the header.
SAFETENSORS_MAX_HEADER = 100 << 20
# How much of a legacy PyTorch checkpoint `sniff_*` reads: the pickled names come first,
# before the tensors' bytes (ResNet-152's take about 60 KB).
SNIFF_BYTES = 1 << 20

# The one table of names: a torch module name (a regular expression) -> its Flax module
# path, and the kind of layer, which says how its tensors map (LEAVES).
_BLOCK = r"layer(?P<stage>[1-4])\.(?P<index>\d+)\."


def _block(match) -> str:
    # torch counts blocks from 0 inside `layerN`; the Flax names count from 1.
    return f"stage{match['stage']}_block{int(match['index']) + 1}"


MODULES = (
    (r"conv1", lambda m: ("stem_conv",), "conv"),
    (r"bn1", lambda m: ("stem_bn",), "bn"),
    (_BLOCK + r"(?P<layer>conv[123])", lambda m: (_block(m), m["layer"]), "conv"),
    (_BLOCK + r"(?P<layer>bn[123])", lambda m: (_block(m), m["layer"]), "bn"),
    (_BLOCK + r"downsample\.0", lambda m: (_block(m), "shortcut_conv"), "conv"),
    (_BLOCK + r"downsample\.1", lambda m: (_block(m), "shortcut_bn"), "bn"),
)
# kind -> torch tensor name -> (Flax collection, Flax leaf name, whether it is a conv kernel,
# stored OIHW in torch and HWIO in Flax). None: read and left out.
LEAVES = {
    "conv": {"weight": ("params", "kernel", True)},
    "bn": {"weight": ("params", "scale", False), "bias": ("params", "bias", False),
           "running_mean": ("batch_stats", "mean", False),
           "running_var": ("batch_stats", "var", False),
           "num_batches_tracked": None},  # optax schedules the run, not this count
}
# Tensors outside the backbone: the 1000-way classifier.
IGNORED = re.compile(r"fc\.(weight|bias)")
# What a timm variant the Flax ResNet does not have looks like.
TIMM_VARIANTS = (
    (re.compile(r"conv1\.\d+\.weight"), "a deep stem (three 3x3 convs: timm's resnet*d, *c, "
                                        "*s and *t)"),
    (re.compile(_BLOCK + r"downsample\.2\.weight"), "an average-pool shortcut (timm's "
                                                    "resnet*d)"),
)
# The input convention of torchvision's and timm's ImageNet weights: RGB in [0, 1]
# normalised by ImageNet's mean and std, 224x224 centre crops.
# The input convention ImageNet ResNets are trained and evaluated with. The size is left to
# the config (the network takes any; the recipes use 224).
IMAGENET_INPUT = {"model.input_norm": "imagenet", "model.crop_fraction": 0.875}


@dataclasses.dataclass(frozen=True)
class ResNetLayout:
    """What a state_dict's tensors say about its ResNet."""

    name: str  # a key of RESNET_DEPTHS
    stage_sizes: tuple
    block: str  # "basic" or "bottleneck"
    num_filters: int  # the stem's output channels
    channels: int  # the input's channels


def kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """A conv weight in torch's OIHW order as a Flax kernel (HWIO)."""
    return np.transpose(weight, (2, 3, 1, 0))


def torch_shape(flax_shape: tuple, is_kernel: bool) -> tuple:
    """The torch shape of a Flax leaf of `flax_shape`: for messages in the file's terms."""
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1]) if is_kernel \
        else tuple(flax_shape)


def flax_location(torch_name: str):
    """(collection, Flax path tuple, is a kernel) for a torch tensor name; "skip" for names
    read and left out; None for names the table does not know."""
    if IGNORED.fullmatch(torch_name):
        return "skip"
    module, _, leaf = torch_name.rpartition(".")
    for pattern, path, kind in MODULES:
        match = re.fullmatch(pattern, module)
        if match:
            if leaf not in LEAVES[kind]:
                return None
            target = LEAVES[kind][leaf]
            if target is None:
                return "skip"
            collection, name, is_kernel = target
            return collection, path(match) + (name,), is_kernel
    return None


# ---------------------------------------------------------------------------------------
# The files.

def container_of(head: bytes) -> str | None:
    """ "torch", "safetensors" or None, from a file's first bytes."""
    if head.startswith(TORCH_ZIP_MAGIC) or head.startswith(TORCH_LEGACY_MAGIC):
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        header_length = int.from_bytes(head[:8], "little")
        if 2 <= header_length <= SAFETENSORS_MAX_HEADER:
            return "safetensors"
    return None


def _read_head(path: str, size: int) -> bytes:
    with open(os.path.expanduser(path), "rb") as f:
        return f.read(size)


def _safetensors_header(path: str) -> dict:
    """The header of a safetensors file, checked against the file's length."""
    path = os.path.expanduser(path)
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        raw = f.read(header_length)
    if len(raw) < header_length:
        raise JaxRetrievalError(
            f"{path}: truncated safetensors file: its header says {header_length} bytes of "
            f"names, the file holds {file_size} bytes in all; download or copy it again")
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise JaxRetrievalError(f"{path}: corrupt safetensors header ({err}); download or "
                                "copy the file again") from None
    header.pop("__metadata__", None)
    end = 8 + header_length + max((entry["data_offsets"][1] for entry in header.values()),
                                  default=0)
    if file_size < end:
        raise JaxRetrievalError(
            f"{path}: truncated safetensors file: its header needs {end} bytes, the file "
            f"holds {file_size}; download or copy it again")
    return header


def _pickled_strings(stream, pickles: int) -> set:
    """The strings in the next `pickles` pickles of `stream`, read opcode by opcode: no
    object is built and no code runs."""
    strings = set()
    try:
        for _ in range(pickles):
            for _, arg, _ in pickletools.genops(stream):
                if isinstance(arg, str):
                    strings.add(arg)
    except Exception:  # noqa: BLE001 - a cut or corrupt pickle: the strings read so far
        pass
    return strings


def _names_in_head(path: str) -> set | None:
    """The tensor names a file shows without reading any tensor (less DataParallel's
    "module." prefix); none for a zip that holds no pickle (an .npz); None when the file is
    in neither container or its names cannot be read (a truncated zip has no directory)."""
    # A pickle's strings include more than the names, so the prefix comes off each one.
    names = _raw_names_in_head(os.path.expanduser(path))
    return None if names is None else {name.removeprefix("module.") for name in names}


def _raw_names_in_head(path: str) -> set | None:
    try:
        head = _read_head(path, SNIFF_BYTES)
        kind = container_of(head)
        if kind == "safetensors":
            return set(_safetensors_header(path))
        if kind == "torch" and head.startswith(TORCH_ZIP_MAGIC):
            with zipfile.ZipFile(path) as archive:
                pickled = [n for n in archive.namelist() if n.endswith("/data.pkl")]
                if not pickled:  # a whole zip of something else (an .npz): no names
                    return set()
                with archive.open(pickled[0]) as stream:
                    return _pickled_strings(stream, 1)
        if kind == "torch":
            # The legacy format: the magic number, the protocol version and the system's
            # details, then the state_dict's pickle (its names), then the tensors' bytes.
            return _pickled_strings(io.BytesIO(head), 4)
    except (OSError, zipfile.BadZipFile, JaxRetrievalError):
        return None
    return None


def _unwrap(obj, path: str) -> dict:
    """The state_dict inside what torch.load returned: training checkpoints keep it under
    "state_dict" or "model"."""
    def holds_tensors(value):
        return isinstance(value, dict) and any(hasattr(v, "shape") for v in value.values())

    if isinstance(obj, dict) and not holds_tensors(obj):
        obj = next((obj[key] for key in ("state_dict", "model") if holds_tensors(obj.get(key))),
                   obj)
    if not holds_tensors(obj):
        what = (f"a dict of {_listing(map(str, obj))}" if isinstance(obj, dict)
                else f"a {type(obj).__name__}")
        raise JaxRetrievalError(
            f"{path}: holds {what}, not a state_dict of tensors; save model.state_dict() "
            "with torch.save")
    return without_data_parallel_prefix(obj)


def without_data_parallel_prefix(tensors: dict) -> dict:
    """`tensors` with DataParallel's "module." taken off names that all carry it."""
    if all(name.startswith("module.") for name in tensors):
        return {name[len("module."):]: value for name, value in tensors.items()}
    return tensors


def _read_torch(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise JaxRetrievalError(
            f"{path} is a PyTorch checkpoint, and reading one needs torch: pip install torch "
            "(the CPU build is enough), or convert the file to .safetensors, which needs "
            "no torch") from None
    if _read_head(path, 4) == TORCH_ZIP_MAGIC and not zipfile.is_zipfile(path):
        raise JaxRetrievalError(
            f"{path}: truncated PyTorch checkpoint: the zip directory at its end is missing "
            f"({os.path.getsize(path)} bytes); download or copy the file again")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise JaxRetrievalError(
            f"{path}: holds more than tensors ({str(err).splitlines()[0]}); load the model "
            "in torch and save its model.state_dict() instead") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise JaxRetrievalError(
            f"{path}: cannot be read as a PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'end of file'}); it is truncated "
            "or corrupt: download or copy it again") from None
    tensors = {}
    for name, value in _unwrap(obj, path).items():
        if not isinstance(value, torch.Tensor):
            raise JaxRetrievalError(f"{path}: {name} is a {type(value).__name__}, not a "
                                    "tensor; save model.state_dict() with torch.save")
        value = value.detach()
        tensors[name] = (value.float() if value.is_floating_point() else value).numpy()
    return tensors


def _read_safetensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    _safetensors_header(path)  # a clear error for a truncated file before the loader's
    try:
        tensors = load_file(os.path.expanduser(path))
    except (SafetensorError, ValueError, TypeError) as err:
        raise JaxRetrievalError(f"{path}: cannot be read as a safetensors file ({err}); it "
                                "is corrupt, or holds bfloat16 tensors: save float32") from None
    return _unwrap(tensors, path)


def read_state_dict(path: str) -> dict:
    """A state_dict file's tensors as numpy arrays (floating point as float32), by name."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise JaxRetrievalError(f"init_from={path!r}: no such file")
    kind = container_of(_read_head(path, 16))
    if kind == "torch":
        return _read_torch(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    raise JaxRetrievalError(
        f"{path}: neither a PyTorch checkpoint (torch.save) nor a .safetensors file (it "
        f"starts with {_read_head(path, 8)!r}); pass a torchvision or timm weights file")


# ---------------------------------------------------------------------------------------
# The ResNet a state_dict holds, and its Flax variables.

def resnet_layout(shapes: dict, path: str = "the file") -> ResNetLayout:
    """The ResNet that tensors of these shapes (name -> shape) belong to."""
    for pattern, what in TIMM_VARIANTS:
        if any(pattern.fullmatch(name) for name in shapes):
            raise JaxRetrievalError(
                f"{path}: a ResNet with {what}, which models.resnet does not build; use a "
                "plain ResNet-18, 34, 50, 101 or 152 file (torchvision's, or timm's "
                "resnet18 ... resnet152)")
    stem = shapes.get("conv1.weight")
    if stem is None or len(stem) != 4:
        some = ", ".join(sorted(shapes)[:5])
        raise JaxRetrievalError(
            f"{path}: not a ResNet state_dict: no conv1.weight of 4 dimensions (its names "
            f"begin {some}); pass torchvision's or timm's resnet18 ... resnet152 weights")
    if tuple(stem[2:]) != (7, 7):
        raise JaxRetrievalError(
            f"{path}: conv1.weight has shape {tuple(stem)}; a torchvision or timm ResNet's "
            "stem is 7x7 (expected (64, 3, 7, 7))")
    blocks = {}
    for name in shapes:
        match = re.match(_BLOCK, name)
        if match:
            blocks.setdefault(int(match["stage"]), set()).add(int(match["index"]))
    stage_sizes = tuple(len(blocks.get(stage, ())) for stage in (1, 2, 3, 4))
    block = "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic"
    for name, (sizes, kind) in RESNET_DEPTHS.items():
        if (sizes, kind) == (stage_sizes, block):
            return ResNetLayout(name, stage_sizes, block, int(stem[0]), int(stem[1]))
    known = "; ".join(f"{n} {s} {k}" for n, (s, k) in RESNET_DEPTHS.items())
    raise JaxRetrievalError(
        f"{path}: {block} blocks per stage {stage_sizes} match no ResNet of models.resnet "
        f"({known})")


def expected_variables(layout: ResNetLayout, small_stem: bool = False) -> dict:
    """The Flax ResNet's variables for `layout` as shapes (no memory, no compute)."""
    import jax
    import jax.numpy as jnp

    model = resnet(layout.name, num_filters=layout.num_filters, small_stem=small_stem)
    dummy = jax.ShapeDtypeStruct((1, 64, 64, layout.channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), dummy)


def model_keys(layout: ResNetLayout) -> dict:
    """The config keys that build the Flax ResNet of `layout`."""
    return {"model.name": layout.name, "model.num_filters": layout.num_filters,
            "model.small_stem": False, "channels": layout.channels}


def _flat(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _listing(items, limit=5) -> str:
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def resnet_variables(tensors: dict, path: str = "the file"):
    """(layout, {"params": ..., "batch_stats": ...}) of the Flax ResNet from a state_dict's
    tensors; every backbone leaf must be there once, with its shape."""
    layout = resnet_layout({name: np.shape(t) for name, t in tensors.items()}, path)
    expected = {collection: dict(_flat(tree))
                for collection, tree in expected_variables(layout).items()}
    variables = {"params": {}, "batch_stats": {}}
    unexpected, filled = [], set()
    for name, tensor in tensors.items():
        location = flax_location(name)
        if location == "skip":
            continue
        if location is None or location[1] not in expected[location[0]]:
            unexpected.append(name)
            continue
        collection, flax_path, is_kernel = location
        want = expected[collection][flax_path].shape
        if tensor.shape != torch_shape(want, is_kernel):
            raise JaxRetrievalError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, a {layout.name} needs "
                f"{torch_shape(want, is_kernel)} there; the file is another architecture "
                "(a wide or grouped ResNet?) than its block counts suggest")
        value = np.asarray(tensor, np.float32)
        _set(variables[collection], flax_path, kernel_from_torch(value) if is_kernel else value)
        filled.add((collection, flax_path))
    missing = ["/".join(p) for c, tree in expected.items() for p in tree if (c, p) not in filled]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing Flax variables ({_listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors ({_listing(unexpected)})")
        raise JaxRetrievalError(
            f"{path}: does not fit a {layout.name}: {'; '.join(parts)}; pass a complete "
            "torchvision or timm ResNet state_dict")
    return layout, variables


# ---------------------------------------------------------------------------------------
# The functions `models/pretrained.py` registers, one set per format.

def sniff_torchvision(path: str) -> bool:
    """True for a PyTorch checkpoint or safetensors file with a plain ResNet's names (also
    timm's plain resnet18 ... resnet152, which share them), or one whose names cannot be
    read (truncated: `load` says so)."""
    try:
        kind = container_of(_read_head(path, 16))
    except OSError:
        return False
    if kind is None:
        return False
    names = _names_in_head(path)
    if names is None:
        return True
    is_resnet = "conv1.weight" in names and "layer1.0.conv1.weight" in names
    return is_resnet and not sniff_timm(path)


def sniff_timm(path: str) -> bool:
    """True for a file whose names are timm's own ResNet variants (deep stem, average-pool
    shortcut), which only timm writes; `load` explains that they are not supported."""
    names = _names_in_head(path) or ()
    return any(pattern.fullmatch(name) for pattern, _ in TIMM_VARIANTS for name in names)


def _shapes(path: str) -> dict:
    """Tensor shapes by name, from a safetensors header alone where it can."""
    path = os.path.expanduser(path)
    if os.path.isfile(path) and container_of(_read_head(path, 16)) == "safetensors":
        return without_data_parallel_prefix(
            {name: tuple(entry["shape"]) for name, entry in _safetensors_header(path).items()})
    return {name: np.shape(t) for name, t in read_state_dict(path).items()}


def decided_keys(path: str) -> dict:
    """The config keys a ResNet file decides: the network and its input convention."""
    return {**model_keys(resnet_layout(_shapes(path), path)), **IMAGENET_INPUT}


def load(path: str, config) -> dict:
    """The backbone's variables from a torchvision or timm ResNet file, as subtrees of
    RetrievalModel's variables (the backbone is its `backbone` attribute); the head is left
    out, to start fresh."""
    layout, variables = resnet_variables(read_state_dict(path), path)
    m = config.model
    wanted = {"model.name": m.name, "model.num_filters": m.num_filters,
              "model.small_stem": m.small_stem, "channels": config.channels}
    for key, value in model_keys(layout).items():
        if wanted[key] != value:
            raise JaxRetrievalError(
                f"{path} holds a {layout.name} with {key}={value!r}, the config has "
                f"{key}={wanted[key]!r}; leave {key} to the file")
    return {"params": {"backbone": variables["params"]},
            "batch_stats": {"backbone": variables["batch_stats"]}}
