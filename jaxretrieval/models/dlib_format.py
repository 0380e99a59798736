"""Reads a network saved by dlib's `serialize(net)`, layer by layer, without dlib.

The reader covers the layer types of dlib's face ResNet
(`dlib_face_recognition_resnet_model_v1.dat`) and returns a plain description: a list of
`DlibLayer`, from the input layer to the loss layer, each with its dlib type name, its
hyper-parameters and its tensors as float32 numpy arrays in dlib's 4-d shapes
(num_samples, k, nr, nc). Mapping the tensors onto a model is the model's business
(`jaxretrieval.models.face_resnet.variables_from_dlib`).

The on-disk format, as dlib writes it:

Scalars. An integer is one control byte, then that many little-endian bytes of its
magnitude (the fewest that hold it): the low four bits of the control byte count the bytes,
and for a signed type bit 0x80 marks a negative value. Zero is one byte of magnitude. A bool
is the character '1' or '0'. A string is its length (an unsigned integer) then its bytes. A
float or double is a `float_details`: a signed 64-bit mantissa then a signed 16-bit
exponent, both as integers above, meaning mantissa * 2**exponent; the exponents 32000,
32001 and 32002 stand for +inf, -inf and NaN.

Tensors. A tensor is version 2, then its four dimensions (num_samples, k, nr, nc) as signed
integers, then its values as raw little-endian IEEE float32, row-major. An alias_tensor (a
view into a layer's flat parameter tensor) is version 1 and the four dimensions only.

Layers. Each layer's details start with a string naming the record and its version
("con_4", "affine_", "relu_", ...), then that type's fields. A layer's trainable values are
one flat tensor `params`; its alias tensors say how to cut it (a convolution's filters from
offset 0, then its biases).

Framing. dlib's network is a nest of C++ templates, and serialising it recurses from the
loss layer inward before any layer's own details are written:

    add_loss_layer: version 1, the loss details, then its subnetwork
    add_layer:      version 2, its subnetwork, then its details, three bools, and the
                    x_grad, cached_output and params_grad tensors
    add_tag_layer / add_skip_layer: version 1, then its subnetwork; nothing else
    add_layer whose subnetwork is the input layer: version 3 (or 2), the input layer's
                    details, its own details, three bools, the x_grad, cached_output and
                    grad_final tensors, and (version 3) the sample expansion factor

So a file holds the loss details, then one version number per layer from the outermost
inward, then the input layer, then every add_layer's details from the innermost outward.
Tags and skips write nothing but their version, which is the same number for both: which
kind each one is, and which tag an add_prev or skip refers to, live in the C++ type, not in
the file. The reader reports them as "tag_or_skip", in place.
"""

import dataclasses
import math
import os

import numpy as np

from jaxretrieval.errors import JaxRetrievalError

# float_details exponents that stand for special values.
FLOAT_INF, FLOAT_NINF, FLOAT_NAN = 32000, 32001, 32002

# Sizes in bytes of the C++ integer types dlib writes here: int, and long / long long.
INT, LONG = 4, 8


@dataclasses.dataclass(frozen=True)
class DlibLayer:
    """One layer of a dlib network, as its file describes it."""

    type: str  # "con", "affine", "relu", "max_pool", "avg_pool", "add_prev", "fc", ...
    params: dict  # hyper-parameters: ints, floats, bools, strings
    tensors: dict  # name -> float32 ndarray, dlib's (num_samples, k, nr, nc) shape


class Stream:
    """A read position in a dlib file's bytes; every read failure is a JaxRetrievalError."""

    def __init__(self, data: bytes, name: str):
        self.data = data
        self.name = name
        self.pos = 0

    def error(self, what: str) -> JaxRetrievalError:
        hint = ("check the path, and download the file again if it is damaged "
                "(dlib_face_recognition_resnet_model_v1.dat comes with "
                "`pip install face-recognition-models`)")
        if self.data[:3] == b"BZh":
            hint = "it looks bzip2-compressed: decompress it first (bunzip2 FILE)"
        return JaxRetrievalError(
            f"{self.name} is not a dlib network file this reader can read: {what} "
            f"(at byte {self.pos} of {len(self.data)}). Expected a network saved by dlib's "
            f"serialize(), such as dlib_face_recognition_resnet_model_v1.dat; {hint}.")

    def take(self, count: int, what: str) -> bytes:
        if count > len(self.data) - self.pos:
            raise self.error(f"the file ends inside {what} (it needs {count} more bytes, "
                             f"{len(self.data) - self.pos} are left; is it truncated?)")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def integer(self, size: int, signed: bool, what: str) -> int:
        control = self.take(1, what)[0]
        # Bits 0x70 are reserved and ignored; bit 0x80 is a signed type's sign, and an
        # unsigned type refuses it (its masked length is then over 8).
        length = control & (0x0F if signed else 0x8F)
        if length == 0 or length > size:
            raise self.error(f"bad integer control byte 0x{control:02x} for {what}")
        value = int.from_bytes(self.take(length, what), "little")
        return -value if signed and control & 0x80 else value

    def signed(self, what: str, size: int = INT) -> int:
        return self.integer(size, True, what)

    def unsigned(self, what: str, size: int = LONG) -> int:
        return self.integer(size, False, what)

    def boolean(self, what: str) -> bool:
        char = self.take(1, what)
        if char not in (b"0", b"1"):
            raise self.error(f"expected a bool ('0' or '1') for {what}, found {char!r}")
        return char == b"1"

    def real(self, what: str) -> float:
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise self.error(f"{what} is not in dlib's binary float format")
        mantissa = self.signed(what, LONG)
        exponent = self.signed(what, 2)
        special = {FLOAT_INF: math.inf, FLOAT_NINF: -math.inf, FLOAT_NAN: math.nan}
        if exponent in special:
            return special[exponent]
        try:
            return math.ldexp(mantissa, exponent)
        except OverflowError:
            raise self.error(f"{what} is out of range: {mantissa} * 2**{exponent}") from None

    def string(self, what: str) -> str:
        length = self.unsigned(f"the length of {what}")
        raw = self.take(length, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(f"expected {what}, found non-text bytes {raw[:24]!r}") from None

    def peek_string(self) -> str | None:
        """The string at the read position, if one is there; the position stays put."""
        start = self.pos
        try:
            return self.string("a string")
        except JaxRetrievalError:
            return None
        finally:
            self.pos = start

    def version(self, what: str, allowed) -> int:
        version = self.signed(f"the version of {what}")
        if version not in allowed:
            raise self.error(f"expected {what} version {' or '.join(map(str, allowed))}, "
                             f"found {version}")
        return version

    def shape(self, what: str) -> tuple:
        dims = tuple(self.signed(f"a dimension of {what}", LONG) for _ in range(4))
        if min(dims) < 0:
            raise self.error(f"negative dimension in {what}: {dims}")
        return dims

    def tensor(self, what: str) -> np.ndarray:
        self.version(what, (2,))
        dims = self.shape(what)
        count = int(np.prod(dims, dtype=np.int64))
        values = np.frombuffer(self.take(4 * count, f"the values of {what}"), "<f4")
        return values.astype(np.float32).reshape(dims)

    def alias(self, what: str) -> tuple:
        self.version(what, (1,))
        return self.shape(what)


def cut(stream: Stream, params: np.ndarray, shapes: dict, what: str) -> dict:
    """Slices a layer's flat `params` tensor into named arrays, in order; empty ones dropped."""
    flat, offset, tensors = params.reshape(-1), 0, {}
    for name, dims in shapes.items():
        size = int(np.prod(dims, dtype=np.int64))
        if size:
            tensors[name] = flat[offset:offset + size].reshape(dims)
        offset += size
    if offset != flat.size:
        raise stream.error(f"the {what} parameters hold {flat.size} values, but its "
                           f"{' and '.join(shapes)} need {offset}")
    return tensors


def read_learning_rates(s: Stream) -> dict:
    names = ("learning_rate_multiplier", "weight_decay_multiplier",
             "bias_learning_rate_multiplier", "bias_weight_decay_multiplier")
    return {name: s.real(name) for name in names}


def read_con(s: Stream, record: str) -> DlibLayer:
    params = s.tensor("the con_ parameters")
    p = {"num_filters": s.signed("num_filters", LONG),
         "kernel": (s.signed("the kernel rows", LONG), s.signed("the kernel columns", LONG)),
         "stride": (s.signed("stride_y"), s.signed("stride_x")),
         "padding": (s.signed("padding_y"), s.signed("padding_x"))}
    shapes = {"filters": s.alias("the con_ filters"), "biases": s.alias("the con_ biases")}
    p.update(read_learning_rates(s))
    p["use_bias"] = s.boolean("use_bias") if record in ("con_5", "con_6") else True
    p["use_relu"] = s.boolean("use_relu") if record == "con_6" else False
    tensors = cut(s, params, shapes, "con_")
    if shapes["filters"][0] != p["num_filters"] or shapes["filters"][2:] != p["kernel"]:
        raise s.error(f"con_ filters of shape {shapes['filters']} do not match "
                      f"{p['num_filters']} filters of {p['kernel']}")
    return DlibLayer("con", p, tensors)


def read_pool(kind: str):
    def read(s: Stream, record: str) -> DlibLayer:
        p = {"kernel": (s.signed("the window rows", LONG), s.signed("the window columns", LONG)),
             "stride": (s.signed("stride_y"), s.signed("stride_x")),
             "padding": (s.signed("padding_y"), s.signed("padding_x"))}
        # A zero-sized window pools the whole input ("everything").
        return DlibLayer(kind, p, {})
    return read


def read_fc(s: Stream, record: str) -> DlibLayer:
    p = {"num_outputs": s.unsigned("num_outputs"), "num_inputs": s.unsigned("num_inputs")}
    params = s.tensor("the fc_ parameters")
    shapes = {"weights": s.alias("the fc_ weights"), "biases": s.alias("the fc_ biases")}
    bias_mode = s.signed("bias_mode")
    if bias_mode not in (0, 1):
        raise s.error(f"unknown fc_ bias mode {bias_mode}")
    p["bias_mode"] = ("has_bias", "no_bias")[bias_mode]
    p.update(read_learning_rates(s))
    p["use_bias"] = s.boolean("use_bias") if record == "fc_3" else True
    return DlibLayer("fc", p, cut(s, params, shapes, "fc_"))


def read_affine(s: Stream, record: str) -> DlibLayer:
    params = s.tensor("the affine_ parameters")
    shapes = {"gamma": s.alias("the affine_ gamma"), "beta": s.alias("the affine_ beta")}
    mode = s.signed("the affine_ mode")
    if mode not in (0, 1):
        raise s.error(f"unknown affine_ mode {mode}")
    p = {"mode": ("conv", "fc")[mode],
         "disabled": s.boolean("disabled") if record == "affine_2" else False}
    return DlibLayer("affine", p, cut(s, params, shapes, "affine_"))


def read_relu(s: Stream, record: str) -> DlibLayer:
    return DlibLayer("relu", {"disabled": s.boolean("disabled") if record == "relu_2" else False},
                     {})


def read_add_prev(s: Stream, record: str) -> DlibLayer:
    return DlibLayer("add_prev", {}, {})


def read_loss_metric(s: Stream, record: str) -> DlibLayer:
    if record == "loss_metric_":  # the first version kept these fixed, not in the file
        return DlibLayer("loss_metric", {"margin": 0.1, "distance_threshold": 0.75}, {})
    p = {"margin": float(np.float32(s.real("the margin"))),  # C++ floats, as in dlib
         "distance_threshold": float(np.float32(s.real("the distance threshold")))}
    return DlibLayer("loss_metric", p, {})


def read_input_rgb_image_sized(s: Stream, record: str) -> DlibLayer:
    # The means are C++ floats: rounded to float32 as dlib holds them.
    p = {name: float(np.float32(s.real(name))) for name in ("avg_red", "avg_green", "avg_blue")}
    p["rows"] = s.unsigned("the input rows")
    p["columns"] = s.unsigned("the input columns")
    return DlibLayer("input_rgb_image_sized", p, {})


# Record name (with its version suffix) -> reader of the fields after the name.
LOSS_RECORDS = {"loss_metric_": read_loss_metric, "loss_metric_2": read_loss_metric}
INPUT_RECORDS = {"input_rgb_image_sized": read_input_rgb_image_sized}
LAYER_RECORDS = {
    "con_4": read_con, "con_5": read_con, "con_6": read_con,
    "max_pool_2": read_pool("max_pool"),
    "avg_pool_2": read_pool("avg_pool"),
    "fc_2": read_fc, "fc_3": read_fc,
    "affine_": read_affine, "affine_2": read_affine,
    "relu_": read_relu, "relu_2": read_relu,
    "add_prev_": read_add_prev,
}


def read_record(s: Stream, readers: dict, what: str) -> DlibLayer:
    record = s.peek_string()
    if record not in readers:
        found = ("no record name" if record is None else
                 f"the record {record[:40]!r}, which this reader does not know (it reads the "
                 "layer types of dlib's face ResNet)")
        raise s.error(f"expected {what} ({', '.join(sorted(readers))}), found {found}")
    s.string("a record name")
    return readers[record](s, record)


def skip_layer_trailer(s: Stream, version: int, innermost: bool) -> None:
    """Reads past what an add_layer writes after its details: flags and training state."""
    for flag in ("this_layer_setup_called", "gradient_input_is_stale",
                 "get_output_and_gradient_input_disabled"):
        s.boolean(flag)
    s.tensor("x_grad")
    s.tensor("cached_output")
    if innermost:
        s.tensor("grad_final")
        if version >= 3:
            s.unsigned("the sample expansion factor", INT)
    else:
        s.tensor("params_grad")


def parse_dlib_network(data: bytes, name: str = "the data") -> list:
    """The layers of a serialized dlib network, from its input layer to its loss layer."""
    s = Stream(data, name)
    if not data:
        raise s.error("the file is empty")
    s.version("the loss layer", (1,))
    loss = read_record(s, LOSS_RECORDS, "a loss layer record")

    # One version per layer from the outermost inward, until the add_layer that holds the
    # input layer: its version is followed by the input layer's record name.
    outer = []
    while True:
        version = s.signed("a layer version")
        if s.peek_string() in INPUT_RECORDS:
            if version not in (2, 3):
                raise s.error(f"expected an add_layer (version 2 or 3) around the input layer, "
                              f"found version {version}")
            break
        if version not in (1, 2):
            raise s.error(f"expected a layer version (1: tag or skip, 2: add_layer), "
                          f"found {version}")
        outer.append(version)

    layers = [read_record(s, INPUT_RECORDS, "an input layer record"),
              read_record(s, LAYER_RECORDS, "a layer record")]
    skip_layer_trailer(s, version, innermost=True)
    for version in reversed(outer):
        if version == 1:
            layers.append(DlibLayer("tag_or_skip", {}, {}))
        else:
            layers.append(read_record(s, LAYER_RECORDS, "a layer record"))
            skip_layer_trailer(s, version, innermost=False)
    layers.append(loss)
    return layers


def read_dlib_network(path) -> list:
    """Reads the network file at `path`: its layers from the input layer to the loss layer."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise JaxRetrievalError(f"cannot read the dlib network file {path}: {e.strerror}; "
                                "check the path") from None
    return parse_dlib_network(data, path)
