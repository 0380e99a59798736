"""Structured (channel) pruning: whole filters are removed and the model is rewritten with
smaller widths, so its dense convolutions really do less work.

Each prunable layer keeps the `keep` share of its output channels, ranked by the magnitude
of their BatchNorm scale (Liu et al., "network slimming", 2017) or, without BatchNorm, by
the L1 norm of their filter (Li et al., "Pruning filters for efficient ConvNets", 2017).
Removing a channel deletes its filter, its BatchNorm entries and its input weights in the
layer that reads it; the result computes exactly what the full model computes with those
channels' activations set to zero (`mask_channels`), and fine-tuning then recovers.

The seed CNN prunes every conv layer (`model.widths`). A ResNet prunes the inner convs of
each residual block (`model.block_widths`): the channels a shortcut adds up keep their
width.
"""

import dataclasses

import jax
import numpy as np

from jaxretrieval.compress.base import Compressed, Method, Option, Source, fine_tune_options
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models.resnet import RESNET_DEPTHS


@dataclasses.dataclass(frozen=True)
class Channels:
    """One layer's output channels: the entries that hold them (`producers`, the channel
    axis of each) and those that read them (`consumers`, with their input axis)."""

    name: str
    width: int
    importance: np.ndarray  # [width], larger is kept first
    producers: tuple  # ((collection, path...), axis)
    consumers: tuple  # ((collection, path...), axis, rows per channel or 0)


def _get(variables, path):
    node = variables
    for key in path:
        node = node[key]
    return np.asarray(node)


def _set(variables, path, value):
    node = variables
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _copy(variables):
    return jax.tree.map(np.asarray, variables)


def seed_cnn_groups(config, variables) -> list:
    """The seed CNN's prunable layers: each conv's output channels."""
    m = config.model
    params = variables["params"]
    groups = []
    for i, width in enumerate(m.widths):
        conv, norm = ("params", "backbone", f"Conv_{i}"), f"BatchNorm_{i}"
        producers = [(conv + ("kernel",), 3)]
        if m.batch_norm:
            producers += [(("params", "backbone", norm, "scale"), 0),
                          (("params", "backbone", norm, "bias"), 0),
                          (("batch_stats", "backbone", norm, "mean"), 0),
                          (("batch_stats", "backbone", norm, "var"), 0)]
            importance = np.abs(_get(variables, ("params", "backbone", norm, "scale")))
        else:
            producers.append((conv + ("bias",), 0))
            importance = np.abs(_get(variables, conv + ("kernel",))).sum(axis=(0, 1, 2))
        if i + 1 < len(m.widths):
            consumers = [(("params", "backbone", f"Conv_{i + 1}", "kernel"), 2, 0)]
        else:  # the head reads the last feature map, flattened or pooled
            head = "hidden" if m.hidden_dim else "projection"
            rows = params[head]["kernel"].shape[0]
            per_channel = rows // width if m.pooling == "flatten" else 0
            consumers = [(("params", head, "kernel"), 0, per_channel)]
        groups.append(Channels(f"Conv_{i}", width, importance, tuple(producers),
                               tuple(consumers)))
    return groups


def resnet_groups(config, variables) -> list:
    """A ResNet's prunable layers: the inner convs of each residual block."""
    m = config.model
    stage_sizes, block = RESNET_DEPTHS[m.name]
    inner = ("conv1",) if block == "basic" else ("conv1", "conv2")
    groups, position = [], 0
    for stage, blocks in enumerate(stage_sizes):
        for index in range(blocks):
            prefix = ("backbone", f"stage{stage + 1}_block{index + 1}")
            width = (int(m.block_widths[position]) if m.block_widths
                     else m.num_filters * 2 ** stage)
            position += 1
            for conv in inner:
                norm = "bn" + conv[-1]
                following = f"conv{int(conv[-1]) + 1}"
                groups.append(Channels(
                    "/".join(prefix[1:] + (conv,)), width,
                    np.abs(_get(variables, ("params",) + prefix + (norm, "scale"))),
                    ((("params",) + prefix + (conv, "kernel"), 3),
                     (("params",) + prefix + (norm, "scale"), 0),
                     (("params",) + prefix + (norm, "bias"), 0),
                     (("batch_stats",) + prefix + (norm, "mean"), 0),
                     (("batch_stats",) + prefix + (norm, "var"), 0)),
                    ((("params",) + prefix + (following, "kernel"), 2, 0),)))
    return groups


def channel_groups(config, variables) -> list:
    if config.model.name == "seed_cnn":
        return seed_cnn_groups(config, variables)
    if config.model.name in RESNET_DEPTHS:
        return resnet_groups(config, variables)
    raise JaxRetrievalError(
        f"compress --method channels rewrites seed_cnn and resnet models; this run's "
        f"model.name is {config.model.name!r}: use --method prune or share")


def kept_channels(groups, keep: float) -> dict:
    """group name -> the sorted indices of the channels kept: the `keep` share (at least
    one) of most important ones."""
    kept = {}
    for group in groups:
        count = max(1, int(round(keep * group.width)))
        order = np.argsort(-group.importance, kind="stable")
        kept[group.name] = np.sort(order[:count])
    return kept


def _consumer_rows(channels, width, per_channel):
    """The input rows that read `channels`: the channels themselves, or for a flattened
    feature map ([H, W, C] row-major) every position's copy of them."""
    if not per_channel:
        return channels
    positions = np.arange(per_channel)[:, None] * width
    return (positions + channels[None, :]).ravel()


def prune_channels(variables, groups, kept: dict) -> dict:
    """`variables` with only the `kept` channels of each group, in the smaller shapes."""
    out = _copy(variables)
    for group in groups:
        channels = kept[group.name]
        for path, axis in group.producers:
            _set(out, path, np.take(_get(out, path), channels, axis=axis))
        for path, axis, per_channel in group.consumers:
            rows = _consumer_rows(channels, group.width, per_channel)
            _set(out, path, np.take(_get(out, path), rows, axis=axis))
    return out


def mask_channels(variables, groups, kept: dict) -> dict:
    """`variables` in their full shapes, with every removed channel's input weights zeroed
    where it is read: the full model then computes what the pruned one computes."""
    out = _copy(variables)
    for group in groups:
        removed = np.setdiff1d(np.arange(group.width), kept[group.name])
        for path, axis, per_channel in group.consumers:
            value = np.array(_get(out, path))
            rows = _consumer_rows(removed, group.width, per_channel)
            index = [slice(None)] * value.ndim
            index[axis] = rows
            value[tuple(index)] = 0
            _set(out, path, value)
    return out


def pruned_config(config, groups, kept: dict):
    """`config` with the model's widths of the pruned layers."""
    config = config.copy_and_resolve_references()
    counts = [len(kept[group.name]) for group in groups]
    if config.model.name == "seed_cnn":
        config.model.widths = tuple(counts)
    else:  # a bottleneck's two inner convs keep the same count: one width per block
        per_block = len(counts) // sum(RESNET_DEPTHS[config.model.name][0])
        config.model.block_widths = tuple(counts[::per_block])
    return config


class ChannelPruning(Method):
    name = "channels"
    summary = ("structured pruning: removes whole channels and rewrites the model with "
               "smaller widths (faster), then fine-tunes")
    options = {
        "keep": Option(0.65, "share of each pruned layer's channels kept", low=0.0, high=1.0,
                       open_low=True),
        **fine_tune_options(steps=300, learning_rate=1e-3),
    }

    def check_source(self, config) -> None:
        if config.model.name != "seed_cnn" and config.model.name not in RESNET_DEPTHS:
            channel_groups(config, None)  # raises, naming the models it rewrites

    def compress(self, source: Source, options: dict) -> Compressed:
        config, variables = source.config, source.variables
        groups = channel_groups(config, variables)
        kept = kept_channels(groups, options["keep"])
        config = pruned_config(config, groups, kept)
        variables = prune_channels(variables, groups, kept)
        variables = source.fine_tune(config, variables, steps=options["steps"],
                                     learning_rate=options["learning_rate"])
        widths = {group.name: int(len(kept[group.name])) for group in groups}
        return Compressed(config=config, variables=variables, facts={"widths": widths})


CHANNELS = ChannelPruning()
