"""The listing of every config key with its value and meaning (`jaxretrieval config`).

The meanings are the comments of `config.base_config`'s own source, read back with
`tokenize`, so the listing cannot drift from the code: a key without a comment there is
listed without one. Backbone and loss options, which base_config adds from their registries,
are described by the registry entries that declare them.
"""

import inspect
import io
import re
import tokenize

import ml_collections

from jaxretrieval import config as config_module
from jaxretrieval.losses import LOSS_OPTIONS, LOSSES
from jaxretrieval.models import BACKBONES

# `c.KEY = value` or `c.SECTION.KEY = value` at the start of a line of base_config.
_ASSIGNMENT = re.compile(r"^\s*c\.([\w.]+)\s*=")
_BACKBONE_OPTIONS_LINE = "backbone_options()"
_LOSS_OPTIONS_LINE = "DEFAULT_LOSS_OPTIONS"


def _comments_by_line(source: str) -> dict:
    """{line number: comment text without '#'} for every comment in `source`."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    return comments


def _value_text(value) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_value_text(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def _used_by(key, registry) -> str:
    return ", ".join(name for name, entry in registry.items() if key in entry.options)


def describe_config(config: ml_collections.ConfigDict) -> str:
    """Every key of `config` as `key = value  # meaning` lines, in base_config's order and
    with its section comments; values are `config`'s own (a config file's, or the defaults)."""
    source = inspect.getsource(config_module.base_config)
    comments = _comments_by_line(source)
    known = list(config_module.flat_keys(config))
    lines, listed = [], set()

    def add(key, meaning=""):
        if key in known and key not in listed:
            value = _value_text(_lookup(config, key))
            lines.append(f"{key} = {value}" + (f"  # {meaning}" if meaning else ""))
            listed.add(key)

    for number, text in enumerate(source.splitlines(), start=1):
        stripped = text.strip()
        if stripped.startswith("#"):
            lines.append(f"# {comments.get(number, '')}".rstrip())
        elif not stripped:
            if lines and lines[-1]:
                lines.append("")
        elif _BACKBONE_OPTIONS_LINE in stripped:
            for key in known:
                leaf = key.rsplit(".", 1)[-1]
                if key.startswith("model.") and _used_by(leaf, BACKBONES):
                    add(key, f"read by model.name {_used_by(leaf, BACKBONES)}")
        elif _LOSS_OPTIONS_LINE in stripped:
            for key in known:
                leaf = key.rsplit(".", 1)[-1]
                if key.startswith("loss_options.") and leaf in LOSS_OPTIONS:
                    valid = LOSS_OPTIONS[leaf].valid
                    add(key, f"read by loss {_used_by(leaf, LOSSES)}; a value {valid}")
        else:
            match = _ASSIGNMENT.match(text)
            if match:
                add(match.group(1), comments.get(number, ""))
    rest = [key for key in known if key not in listed]
    if rest:
        lines += ["", "# Keys this config adds to the defaults."]
        for key in rest:
            add(key)
    return "\n".join(lines).strip() + "\n"


def _lookup(config, dotted_key):
    node = config
    for name in dotted_key.split("."):
        node = node[name]
    return node
