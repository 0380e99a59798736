"""A saved, searchable gallery of embeddings, served by ScaNN.

Rows (ints 0..count-1) identify gallery items inside arrays; `keys` maps
rows to the caller's string ids. Scores are dot products of L2-normalised
vectors, so higher is better.

On-disk layout of an index directory:

    manifest.json    format version, model identity, ScaNN settings, ...
    keys.json        JSON list of row keys
    sources.json     JSON list of row sources (absent when there are none)
    embeddings.npy   float32 [count, dim], so the index can be rebuilt
    scann/           ScaNN's serialized searcher

Loading never unpickles anything: ScaNN's `load_searcher` would unpickle a
`scann_docids.pkl` if one were present, so we construct the searcher from
its assets ourselves and never hand doc ids to ScaNN.
"""

import copy
import importlib.metadata
import json
import math
import operator
import os
import shutil

import numpy as np

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.workdir import new_sibling_directory, recover_interrupted_swap, swap_in

FORMAT_VERSION = 1
EXACT_SEARCH_MAX_COUNT = 20_000  # above this, tree + asymmetric hashing + reordering

DISTANCE = "dot_product"
REORDER_NUM_NEIGHBORS = 200
LEAVES_TO_SEARCH_FRACTION = 0.05
# Small trees would search only one or two leaves at 5%, which costs recall
# for almost no speed.
MIN_LEAVES_TO_SEARCH = 10
MAX_TRAINING_SAMPLE_SIZE = 250_000
AH_DIMENSIONS_PER_BLOCK = 2
AH_ANISOTROPIC_THRESHOLD = 0.2
NORM_TOLERANCE = 1e-2

MANIFEST_FILE = "manifest.json"
KEYS_FILE = "keys.json"
SOURCES_FILE = "sources.json"
EMBEDDINGS_FILE = "embeddings.npy"
SCANN_DIR = "scann"
SCANN_ASSETS_FILE = "scann_assets.pbtxt"

# Keys the index itself maintains; callers may add any others.
CORE_MANIFEST_KEYS = frozenset({
    "format_version", "embedding_dim", "count", "checkpoint_step",
    "model_config_hash", "scann_version", "distance", "scann",
})

REBUILD_HINT = ("rebuild it with `python -m train --eval_only --workdir DIR` "
                "(DIR is the training workdir)")


def _scann_ops_pybind():
    # Imported lazily: `import scann` also imports TensorFlow, which takes
    # seconds and is not needed until an index is built or loaded.
    from scann.scann_ops.py import scann_ops_pybind
    return scann_ops_pybind


def _scann_version():
    import scann
    version = getattr(scann, "__version__", None)
    return version or importlib.metadata.version("scann")


def _as_float_matrix(values, what):
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise JaxRetrievalError(
            f"{what} must be numeric float arrays; converting failed: {error}"
        ) from None
    return array


def _check_finite(array, what):
    if not np.isfinite(array).all():
        bad_row = int(np.argwhere(~np.isfinite(array))[0][0])
        raise JaxRetrievalError(
            f"{what} contain NaN or infinite values (first at row {bad_row}); "
            "check the model outputs before indexing or searching")


def _checked_embeddings(embeddings):
    array = _as_float_matrix(embeddings, "embeddings")
    if array.ndim != 2:
        raise JaxRetrievalError(
            f"embeddings must have shape [count, dim], got shape {array.shape}")
    count, dim = array.shape
    if count == 0:
        raise JaxRetrievalError(
            "the gallery is empty: pass at least one embedding to Index.build")
    if dim == 0:
        raise JaxRetrievalError("embeddings have dimension 0")
    _check_finite(array, "embeddings")
    norms = np.linalg.norm(array, axis=1)
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        bad_row = int(np.argmax(off))
        raise JaxRetrievalError(
            f"embeddings must be L2-normalised (scores are dot products), but "
            f"row {bad_row} has norm {norms[bad_row]:.4f}; divide each row "
            "by its norm before building the index")
    return np.ascontiguousarray(array)


def _checked_strings(values, count, what):
    if isinstance(values, (str, bytes)):
        raise JaxRetrievalError(f"{what} must be a list of strings, not one string")
    strings = list(values)
    if len(strings) != count:
        raise JaxRetrievalError(
            f"got {count} embeddings but {len(strings)} {what}; "
            "pass exactly one per embedding row")
    for row, value in enumerate(strings):
        if not isinstance(value, str):
            raise JaxRetrievalError(
                f"{what} must be strings, but row {row} is "
                f"{type(value).__name__} {value!r}")
    # Plain str, so numpy string scalars don't leak out through `keys`.
    return [str(value) for value in strings]


def _row_by_key(keys):
    row_by_key = {}
    for row, key in enumerate(keys):
        if key in row_by_key:
            raise JaxRetrievalError(
                f"duplicate key {key!r} at rows {row_by_key[key]} and {row}; "
                "every gallery item needs a unique key")
        row_by_key[key] = row
    return row_by_key


def _json_normalised(value, what):
    # A JSON round trip now means the manifest compares equal after load
    # (tuples become lists, etc.) and bad values fail here, not in save().
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise JaxRetrievalError(
            f"{what} must be JSON-serialisable (plain dicts, lists, str, int, "
            f"finite float): {error}") from None


def _checked_manifest_updates(updates, what):
    clashing = sorted(CORE_MANIFEST_KEYS.intersection(updates))
    if clashing:
        raise JaxRetrievalError(
            f"{what} may not set {', '.join(clashing)}: the index maintains "
            "those itself")
    return _json_normalised(dict(updates), what)


def _scann_settings(count):
    if count <= EXACT_SEARCH_MAX_COUNT:
        return {"mode": "exact"}
    num_leaves = max(2, round(math.sqrt(count)))
    num_leaves_to_search = min(
        num_leaves,
        max(MIN_LEAVES_TO_SEARCH,
            math.ceil(LEAVES_TO_SEARCH_FRACTION * num_leaves)))
    return {
        "mode": "tree_ah",
        "num_leaves": num_leaves,
        "num_leaves_to_search": num_leaves_to_search,
        "training_sample_size": min(count, MAX_TRAINING_SAMPLE_SIZE),
        "dimensions_per_block": AH_DIMENSIONS_PER_BLOCK,
        "anisotropic_quantization_threshold": AH_ANISOTROPIC_THRESHOLD,
        "reorder_num_neighbors": REORDER_NUM_NEIGHBORS,
    }


def _build_searcher(embeddings, settings):
    builder = _scann_ops_pybind().builder(embeddings, 10, DISTANCE)
    if settings["mode"] == "exact":
        builder = builder.score_brute_force()
    else:
        builder = builder.tree(
            num_leaves=settings["num_leaves"],
            num_leaves_to_search=settings["num_leaves_to_search"],
            training_sample_size=settings["training_sample_size"],
        ).score_ah(
            settings["dimensions_per_block"],
            anisotropic_quantization_threshold=settings[
                "anisotropic_quantization_threshold"],
        ).reorder(settings["reorder_num_neighbors"])
    # No docids: ScaNN would pickle them on serialize(); rows are its ids.
    return builder.build()


def _load_searcher(scann_dir):
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
    pybind = _scann_ops_pybind()
    # Not pybind.load_searcher(): it unpickles scann_docids.pkl if present.
    searcher = pybind.scann_pybind.ScannNumpy(
        os.path.abspath(scann_dir), text_format.MessageToString(assets))
    return pybind.ScannSearcher(searcher)


def _read_json(path):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2, ensure_ascii=False)
        file.write("\n")


class Index:
    """A ScaNN searcher over a gallery, plus its keys and manifest.

    Make one with `Index.build` or `Index.load`.
    """

    def __init__(self, searcher, embeddings, keys, sources, manifest):
        self._searcher = searcher
        self._embeddings = embeddings
        self._keys = keys
        self._row_by_key = _row_by_key(keys)
        self._sources = sources
        self._manifest = manifest

    @classmethod
    def build(cls, embeddings, keys, *, sources=None, checkpoint_step,
              model_config_hash, extra_manifest=None):
        """Indexes L2-normalised float32 `embeddings` [n, d] under `keys`.

        `sources` optionally names where each row came from. Galleries of
        more than EXACT_SEARCH_MAX_COUNT items get approximate search.
        """
        embeddings = _checked_embeddings(embeddings)
        count, dim = embeddings.shape
        keys = _checked_strings(keys, count, "keys")
        _row_by_key(keys)
        if sources is not None:
            sources = _checked_strings(sources, count, "sources")
        try:
            checkpoint_step = operator.index(checkpoint_step)
        except TypeError:
            raise JaxRetrievalError(
                f"checkpoint_step must be an integer, got {checkpoint_step!r}"
            ) from None
        if not isinstance(model_config_hash, str):
            raise JaxRetrievalError(
                f"model_config_hash must be a string, got {model_config_hash!r}")
        extra = _checked_manifest_updates(extra_manifest or {}, "extra_manifest")

        settings = _scann_settings(count)
        manifest = {
            "format_version": FORMAT_VERSION,
            "embedding_dim": dim,
            "count": count,
            "checkpoint_step": checkpoint_step,
            "model_config_hash": model_config_hash,
            "scann_version": _scann_version(),
            "distance": DISTANCE,
            "scann": settings,
            **extra,
        }
        searcher = _build_searcher(embeddings, settings)
        return cls(searcher, embeddings, keys, sources, manifest)

    @property
    def manifest(self):
        """A copy of the manifest dict (what `save` writes to manifest.json)."""
        return copy.deepcopy(self._manifest)

    @property
    def count(self):
        return len(self._keys)

    @property
    def embedding_dim(self):
        return self._embeddings.shape[1]

    @property
    def keys(self):
        """The key of each row, in row order. Shared: do not modify."""
        return self._keys

    @property
    def sources(self):
        """The source of each row, in row order, or None. Shared: do not modify."""
        return self._sources

    def source_of(self, key):
        """The source recorded for `key`, or None if the index has no sources."""
        if key not in self._row_by_key:
            raise JaxRetrievalError(f"key {key!r} is not in the index")
        if self._sources is None:
            return None
        return self._sources[self._row_by_key[key]]

    def update_manifest(self, **updates):
        """Adds or replaces manifest entries, e.g. `match_thresholds={...}`.

        Values must be JSON-serialisable. Call `save` to persist them.
        """
        self._manifest.update(_checked_manifest_updates(updates, "update_manifest"))

    def with_manifest(self, **updates):
        """A copy of this index with manifest entries added or replaced.

        The copy shares the (read-only) searcher and arrays with this one.
        """
        updated = Index(self._searcher, self._embeddings, self._keys,
                        self._sources, copy.deepcopy(self._manifest))
        updated.update_manifest(**updates)
        return updated

    def _checked_queries(self, queries):
        array = _as_float_matrix(queries, "queries")
        if array.ndim == 1:
            array = array[np.newaxis, :]
        if array.ndim != 2:
            raise JaxRetrievalError(
                f"queries must have shape [m, {self.embedding_dim}] or "
                f"[{self.embedding_dim}], got shape {array.shape}")
        if array.shape[1] != self.embedding_dim:
            raise JaxRetrievalError(
                f"queries have dimension {array.shape[1]} but the index has "
                f"dimension {self.embedding_dim}; embed queries with the same "
                "model that built the index")
        _check_finite(array, "queries")
        return np.ascontiguousarray(array)

    def _clipped_k(self, k):
        if isinstance(k, bool):
            raise JaxRetrievalError(f"k must be an integer >= 1, got {k!r}")
        try:
            k = operator.index(k)
        except TypeError:
            raise JaxRetrievalError(f"k must be an integer >= 1, got {k!r}") from None
        if k < 1:
            raise JaxRetrievalError(f"k must be an integer >= 1, got {k}")
        return min(k, self.count)

    def search_rows(self, queries, k):
        """The best min(k, count) rows and scores for each query, best first.

        `queries` is [m, d] or a single [d] vector. Returns int64 rows and
        float32 scores, both [m, min(k, count)]. Approximate search can find
        fewer than k items; missing slots hold row -1 and score -inf.
        """
        queries = self._checked_queries(queries)
        k = self._clipped_k(k)
        if queries.shape[0] == 0:
            # ScaNN rejects an empty batch.
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        settings = self._manifest["scann"]
        if settings["mode"] == "exact":
            rows, scores = self._searcher.search_batched(queries, k)
        else:
            # Reordering keeps only pre_reorder_num_neighbors candidates, so
            # a large k needs at least k of them.
            rows, scores = self._searcher.search_batched(
                queries, k,
                pre_reorder_num_neighbors=max(
                    k, settings["reorder_num_neighbors"]))
        rows = np.asarray(rows, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        # ScaNN pads short result lists with row 0 and a NaN score.
        missing = np.isnan(scores)
        rows[missing] = -1
        scores[missing] = -np.inf
        return rows, scores

    def search(self, queries, k, *, threshold=None):
        """The best keys and scores for each query, best first.

        Returns (keys, scores): per query, lists of up to min(k, count)
        strings and Python floats. With `threshold`, results scoring below
        it are dropped.
        """
        if threshold is not None:
            try:
                threshold_value = float(threshold)
            except (TypeError, ValueError):
                threshold_value = math.nan
            if math.isnan(threshold_value):
                raise JaxRetrievalError(
                    f"threshold must be a number or None, got {threshold!r}")
            threshold = threshold_value
        rows, scores = self.search_rows(queries, k)
        all_keys, all_scores = [], []
        for query_rows, query_scores in zip(rows.tolist(), scores.tolist()):
            found_keys, found_scores = [], []
            for row, score in zip(query_rows, query_scores):
                if row < 0 or (threshold is not None and score < threshold):
                    continue
                found_keys.append(self._keys[row])
                found_scores.append(score)
            all_keys.append(found_keys)
            all_scores.append(found_scores)
        return all_keys, all_scores

    def save(self, directory):
        """Writes the index to `directory`, atomically replacing any old one.

        If saving fails, an index already at `directory` is left untouched.
        """
        directory = os.path.abspath(os.fspath(directory))
        if os.path.lexists(directory):
            if not os.path.isdir(directory):
                raise JaxRetrievalError(
                    f"cannot save the index to {directory}: it exists and is "
                    "not a directory; choose another path or remove it")
            if (os.listdir(directory)
                    and not os.path.isfile(os.path.join(directory, MANIFEST_FILE))):
                # Refuse to swap away, and so delete, something that isn't ours.
                raise JaxRetrievalError(
                    f"cannot save the index to {directory}: it is a non-empty "
                    "directory without an index in it; choose another path "
                    "or empty it")
        new_directory = new_sibling_directory(directory)
        try:
            scann_dir = os.path.join(new_directory, SCANN_DIR)
            os.mkdir(scann_dir)
            # Relative asset paths, so the index still loads once renamed.
            self._searcher.serialize(scann_dir, relative_path=True)
            np.save(os.path.join(new_directory, EMBEDDINGS_FILE), self._embeddings)
            _write_json(os.path.join(new_directory, KEYS_FILE), self._keys)
            if self._sources is not None:
                _write_json(os.path.join(new_directory, SOURCES_FILE), self._sources)
            _write_json(os.path.join(new_directory, MANIFEST_FILE), self._manifest)
            swap_in(new_directory, directory)
        except BaseException:
            shutil.rmtree(new_directory, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory, *, expected=None):
        """Loads an index written by `save`.

        `expected` maps manifest keys (e.g. embedding_dim, model_config_hash,
        checkpoint_step) to the values the caller needs; any difference is
        an error telling the user to rebuild the index.
        """
        directory = os.fspath(directory)
        recover_interrupted_swap(directory)
        if not os.path.isdir(directory):
            raise JaxRetrievalError(
                f"no index at {directory}: build it with "
                "`python -m train --eval_only --workdir DIR` "
                "(DIR is the training workdir)")

        def require(relative_path):
            path = os.path.join(directory, relative_path)
            if not os.path.isfile(path):
                raise JaxRetrievalError(
                    f"the index at {directory} is incomplete ({relative_path} "
                    f"is missing): {REBUILD_HINT}")
            return path

        def corrupt(problem):
            return JaxRetrievalError(
                f"the index at {directory} is corrupt ({problem}): {REBUILD_HINT}")

        manifest_path = require(MANIFEST_FILE)
        keys_path = require(KEYS_FILE)
        embeddings_path = require(EMBEDDINGS_FILE)
        require(os.path.join(SCANN_DIR, SCANN_ASSETS_FILE))
        try:
            manifest = _read_json(manifest_path)
            keys = _read_json(keys_path)
        except (ValueError, UnicodeDecodeError) as error:
            raise corrupt(f"unreadable JSON: {error}") from None
        if not isinstance(manifest, dict):
            raise corrupt(f"{MANIFEST_FILE} is not a JSON object")

        version = manifest.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise corrupt(f"format_version is {version!r}")
        if version > FORMAT_VERSION:
            raise JaxRetrievalError(
                f"the index at {directory} has format_version {version}, but "
                f"this jaxretrieval reads only up to {FORMAT_VERSION}: upgrade "
                f"jaxretrieval or {REBUILD_HINT}")
        missing = sorted(CORE_MANIFEST_KEYS - manifest.keys())
        if missing:
            raise corrupt(f"manifest lacks {', '.join(missing)}")

        mismatches = [
            f"{key} is {manifest.get(key)!r} in the index but {value!r} is expected"
            for key, value in (expected or {}).items()
            if manifest.get(key) != value
        ]
        if mismatches:
            raise JaxRetrievalError(
                f"the index at {directory} does not match the current model: "
                f"{'; '.join(mismatches)}. Rebuild the index with "
                "`python -m train --eval_only --workdir DIR` "
                "(DIR is the training workdir)")

        count = manifest["count"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise corrupt(f"{KEYS_FILE} is not a list of strings")
        if len(keys) != count:
            raise corrupt(f"manifest count is {count} but there are {len(keys)} keys")
        sources = None
        sources_path = os.path.join(directory, SOURCES_FILE)
        if os.path.isfile(sources_path):
            try:
                sources = _read_json(sources_path)
            except (ValueError, UnicodeDecodeError) as error:
                raise corrupt(f"unreadable JSON: {error}") from None
            if (not isinstance(sources, list) or len(sources) != count
                    or not all(isinstance(s, str) for s in sources)):
                raise corrupt(f"{SOURCES_FILE} is not a list of {count} strings")

        try:
            embeddings = np.load(embeddings_path, allow_pickle=False)
        except ValueError as error:
            raise corrupt(f"unreadable {EMBEDDINGS_FILE}: {error}") from None
        expected_shape = (count, manifest["embedding_dim"])
        if embeddings.dtype != np.float32 or embeddings.shape != expected_shape:
            raise corrupt(
                f"{EMBEDDINGS_FILE} is {embeddings.dtype} {embeddings.shape}, "
                f"expected float32 {expected_shape}")
        if manifest["scann"].get("mode") not in ("exact", "tree_ah"):
            raise corrupt(f"unknown ScaNN mode {manifest['scann'].get('mode')!r}")

        try:
            searcher = _load_searcher(os.path.join(directory, SCANN_DIR))
        except (OSError, RuntimeError, ValueError) as error:
            raise corrupt(f"ScaNN could not load its assets: {error}") from None
        if searcher.size() != count:
            raise corrupt(
                f"the ScaNN searcher holds {searcher.size()} items, expected {count}")
        try:
            return cls(searcher, embeddings, keys, sources, manifest)
        except JaxRetrievalError as error:
            raise corrupt(str(error)) from None
