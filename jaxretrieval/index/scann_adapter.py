"""ScaNN behind the index: the settings for a gallery size, building a searcher, loading one.

The settings are a JSON dict recorded in the manifest (`scann`), so a saved index is
searched as it was built. `scann_settings(count, overrides)` chooses them; overrides
replace some of the automatic tree settings, for benchmarks that compare settings
(`Index.build(..., scann_overrides=...)`), and are recorded with them so a compaction
keeps them.

Loading never unpickles anything: ScaNN's `load_searcher` would unpickle a
`scann_docids.pkl` if one were present, so the searcher is constructed from its assets
here and ScaNN is never handed doc ids.
"""

import copy
import importlib.metadata
import math
import os

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index.checks import json_normalised
from jaxretrieval.index.precision import DEFAULT as DEFAULT_EMBEDDING_DTYPE
from jaxretrieval.index.precision import checked_dtype, dtype_of

EXACT_SEARCH_MAX_COUNT = 20_000  # above this, tree + asymmetric hashing + reordering

DISTANCE = "dot_product"
REORDER_NUM_NEIGHBORS = 200
# Leaves: this many times sqrt(count) (FAISS's IVF advice is 4 to 16), with
# at least MIN_ROWS_PER_LEAF rows each. A fine partition pays off where the
# data has many small clusters: a leaf per cluster puts a query's neighbours
# in one or two leaves, where coarser leaves mix clusters and need far more
# of them searched. ScaNN dissolves any leaf that gets fewer than its
# min_partition_size of the k-means sample (its default 50 is twice the
# sample per leaf at 10,000 leaves), which would undo the fine partition:
# MIN_PARTITION_SAMPLE keeps such leaves.
# SOAR files each vector under a second leaf too, chosen so its residual is
# near-orthogonal to the first's: more recall per leaf searched; lambda 1.0
# reaches a given recall faster than larger values. AH codes 4 dimensions
# per 4-bit code; exact reordering fixes what the coarser code misorders.
# BENCHMARKS.md has the measurements behind each setting.
LEAVES_PER_SQRT_COUNT = 10
MIN_ROWS_PER_LEAF = 50
MIN_PARTITION_SAMPLE = 5
SCANN_DEFAULT_MIN_PARTITION_SIZE = 50  # what indexes saved before the setting used
SOAR_LAMBDA = 1.0
LEAVES_TO_SEARCH_FRACTION = 0.05
# Small trees would search only one or two leaves at 5%, which costs recall
# for almost no speed.
MIN_LEAVES_TO_SEARCH = 10
MAX_TRAINING_SAMPLE_SIZE = 250_000
AH_DIMENSIONS_PER_BLOCK = 4
AH_ANISOTROPIC_THRESHOLD = 0.2

# The tree settings an override may replace.
TREE_SETTING_KEYS = frozenset({
    "num_leaves", "num_leaves_to_search", "training_sample_size", "min_partition_size",
    "dimensions_per_block", "anisotropic_quantization_threshold", "reorder_num_neighbors",
    "soar_lambda",
})

SCANN_ASSETS_FILE = "scann_assets.pbtxt"


def scann_ops_pybind():
    # Imported lazily: `import scann` also imports TensorFlow, which takes
    # seconds and is not needed until an index is built or loaded.
    from scann.scann_ops.py import scann_ops_pybind as pybind
    return pybind


def scann_version():
    import scann
    version = getattr(scann, "__version__", None)
    return version or importlib.metadata.version("scann")


def checked_overrides(overrides):
    """`overrides` as a JSON-normal dict of tree settings ({} for None)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise JaxRetrievalError(
            f"scann_overrides must be a dict of tree settings, got {overrides!r}")
    unknown = sorted(set(overrides) - TREE_SETTING_KEYS)
    if unknown:
        raise JaxRetrievalError(
            f"scann_overrides may set {', '.join(sorted(TREE_SETTING_KEYS))}; "
            f"unknown: {', '.join(unknown)}")
    return json_normalised(overrides, "scann_overrides")


def scann_settings(count, overrides=None, embedding_dtype=DEFAULT_EMBEDDING_DTYPE):
    """The ScaNN settings for a gallery of `count` items.

    Galleries of up to EXACT_SEARCH_MAX_COUNT items are searched exactly; larger ones
    with a tree, asymmetric hashing and exact reordering, where `overrides` (see
    TREE_SETTING_KEYS) replace the automatic values. Given overrides are recorded under
    "overrides", so settings derived from these (`carried_settings`) apply them again.
    An `embedding_dtype` other than float32 (jaxretrieval.index.precision) is recorded
    as "embedding_dtype".
    """
    overrides = checked_overrides(overrides)
    embedding_dtype = checked_dtype(embedding_dtype)
    if count <= EXACT_SEARCH_MAX_COUNT:
        settings = {"mode": "exact"}
    else:
        num_leaves = overrides.get("num_leaves", max(2, min(
            round(LEAVES_PER_SQRT_COUNT * math.sqrt(count)), count // MIN_ROWS_PER_LEAF)))
        num_leaves_to_search = min(
            num_leaves,
            max(MIN_LEAVES_TO_SEARCH, math.ceil(LEAVES_TO_SEARCH_FRACTION * num_leaves)))
        settings = {
            "mode": "tree_ah",
            "num_leaves": num_leaves,
            "num_leaves_to_search": num_leaves_to_search,
            "training_sample_size": min(count, MAX_TRAINING_SAMPLE_SIZE),
            "min_partition_size": MIN_PARTITION_SAMPLE,
            "dimensions_per_block": AH_DIMENSIONS_PER_BLOCK,
            "anisotropic_quantization_threshold": AH_ANISOTROPIC_THRESHOLD,
            "reorder_num_neighbors": REORDER_NUM_NEIGHBORS,
            "soar_lambda": SOAR_LAMBDA,
            **overrides,
        }
    if overrides:
        settings["overrides"] = overrides
    if embedding_dtype != DEFAULT_EMBEDDING_DTYPE:
        settings["embedding_dtype"] = embedding_dtype
    return settings


def carried_settings(settings, count):
    """Settings for a new searcher over `count` rows that keep a tuned effort.

    Compaction rebuilds the searcher; the share of leaves and the reordering
    count that `Index.tune` chose carry over to the new tree, along with the
    record of the tuning. Recall can drift after many changes: tune again.
    """
    fresh = scann_settings(count, settings.get("overrides"), dtype_of(settings))
    tuned = settings.get("tuned")
    if tuned is None or settings.get("mode") != "tree_ah" or fresh["mode"] != "tree_ah":
        return fresh
    share = settings["num_leaves_to_search"] / settings["num_leaves"]
    fresh["num_leaves_to_search"] = min(
        fresh["num_leaves"], max(1, math.ceil(share * fresh["num_leaves"] - 1e-9)))
    fresh["reorder_num_neighbors"] = settings["reorder_num_neighbors"]
    fresh["tuned"] = copy.deepcopy(tuned)
    return fresh


def _scoring_type(settings):
    """ScaNN's type for scoring rows kept in the settings' embedding dtype."""
    from scann.scann_ops.py.scann_builder import ReorderType
    return {"float32": ReorderType.FLOAT32, "float16": ReorderType.BFLOAT16,
            "int8": ReorderType.INT8}[dtype_of(settings)]


def build_searcher(embeddings, settings):
    builder = scann_ops_pybind().builder(embeddings, 10, DISTANCE)
    if settings["mode"] == "exact":
        builder = builder.score_brute_force(quantize=_scoring_type(settings))
    else:
        # Keys added after format 2's first release are optional: indexes
        # saved without them were built without them.
        builder = builder.tree(
            num_leaves=settings["num_leaves"],
            num_leaves_to_search=settings["num_leaves_to_search"],
            training_sample_size=settings["training_sample_size"],
            min_partition_size=settings.get("min_partition_size",
                                            SCANN_DEFAULT_MIN_PARTITION_SIZE),
            soar_lambda=settings.get("soar_lambda"),
        ).score_ah(
            settings["dimensions_per_block"],
            anisotropic_quantization_threshold=settings[
                "anisotropic_quantization_threshold"],
        ).reorder(settings["reorder_num_neighbors"], quantize=_scoring_type(settings))
    # No docids: ScaNN would pickle them on serialize(); rows are its ids.
    return builder.build()


def load_searcher(scann_dir):
    from google.protobuf import text_format
    from scann.scann_ops import scann_assets_pb2

    assets_path = os.path.join(scann_dir, SCANN_ASSETS_FILE)
    with open(assets_path) as file:
        try:
            assets = text_format.Parse(file.read(), scann_assets_pb2.ScannAssets())
        except text_format.ParseError as error:
            raise ValueError(f"{SCANN_ASSETS_FILE}: {error}") from None
    # Older or foreign assets may hold absolute paths of the directory they
    # were written to; read every asset from this directory instead, and
    # never from anywhere outside it.
    for asset in assets.assets:
        asset.asset_path = os.path.basename(asset.asset_path)
        if not os.path.isfile(os.path.join(scann_dir, asset.asset_path)):
            raise FileNotFoundError(os.path.join(scann_dir, asset.asset_path))
    pybind = scann_ops_pybind()
    # Not pybind.load_searcher(): it unpickles scann_docids.pkl if present.
    searcher = pybind.scann_pybind.ScannNumpy(
        os.path.abspath(scann_dir), text_format.MessageToString(assets))
    return pybind.ScannSearcher(searcher)
