"""The gallery index: ScaNN search over embeddings under string keys, saved, live-updated.

`Index` is one searcher (flat layout); `ShardedIndex` splits items over several
Index shards by key. Both satisfy `SearchIndex`. `open_index` opens a directory of
either layout and `save_index` saves either kind over either layout.

Modules: keys (what a key may be), checks (input checks), scann_adapter (ScaNN
settings, build, load), state (in-memory contents), storage (directories on disk),
wal (the write-ahead log), metadata (item metadata and filters: the rules), filtered
(filtered search: the strategy), tuning (Index.tune and recall@k), protocol (SearchIndex),
flat (Index), sharded (ShardedIndex, open_index, save_index), recovery (recover, for a
damaged log) and follower (LogFollower: a read-only copy that follows a writer's log).
"""

from jaxretrieval.index.checks import normalised_vector
from jaxretrieval.index.flat import Index
from jaxretrieval.index.keys import MAX_KEY_BYTES, check_key, check_keys, shown_key, stored_key
from jaxretrieval.index.metadata import (MAX_METADATA_BYTES, BadFilterError, BadMetadataError,
                                         checked_filter, checked_metadata)
from jaxretrieval.index.protocol import SearchIndex
from jaxretrieval.index.recovery import recover
from jaxretrieval.index.scann_adapter import EXACT_SEARCH_MAX_COUNT, scann_settings
from jaxretrieval.index.sharded import (MAX_NUM_SHARDS, ShardedIndex, checked_num_shards,
                                        embedding_dtype_on_disk, merge_results,
                                        num_shards_on_disk, open_index, save_index, shard_of)
from jaxretrieval.index.storage import (FORMAT_VERSION, UnreadableIndexError, rebuild_hint,
                                        snapshot_directory)
from jaxretrieval.index.tuning import exact_kth_scores, recall_per_query

__all__ = [
    "EXACT_SEARCH_MAX_COUNT", "FORMAT_VERSION", "MAX_KEY_BYTES", "MAX_METADATA_BYTES",
    "MAX_NUM_SHARDS", "BadFilterError", "BadMetadataError", "Index", "SearchIndex",
    "ShardedIndex", "UnreadableIndexError", "check_key", "check_keys", "checked_filter",
    "checked_metadata", "checked_num_shards", "embedding_dtype_on_disk", "exact_kth_scores", "merge_results",
    "normalised_vector", "num_shards_on_disk", "open_index", "rebuild_hint",
    "recall_per_query", "recover", "save_index", "scann_settings", "shard_of", "shown_key",
    "snapshot_directory", "stored_key",
]
