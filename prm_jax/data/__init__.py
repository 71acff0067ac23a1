"""Training data: JSONL records, tokenization into examples, packing and resumable batching.

`records` reads and validates files, `tokenize` turns records into per-token examples for PRM
or causal-LM training, `packing` packs examples into fixed-length rows, and `pipeline` builds the
checkpointable training iterator and the evaluation batches.
"""

from prm_jax.data.packing import PACKED_FIELD_SPECS, positions_from_segment_ids
from prm_jax.data.pipeline import (
    PipelineConfig,
    build_eval_batches,
    build_train_iterator,
    load_prm_examples,
    load_sft_examples,
)
from prm_jax.data.records import (
    DataError,
    PRMRecord,
    SFTRecord,
    prm_labels_are_hard,
    read_prm_records,
    read_sft_records,
)
from prm_jax.data.tokenize import Example, TokenizeConfig, TokenizeStats, tokenize_prm, tokenize_sft

__all__ = [
    "DataError",
    "Example",
    "PACKED_FIELD_SPECS",
    "PRMRecord",
    "PipelineConfig",
    "SFTRecord",
    "TokenizeConfig",
    "TokenizeStats",
    "build_eval_batches",
    "build_train_iterator",
    "load_prm_examples",
    "load_sft_examples",
    "positions_from_segment_ids",
    "prm_labels_are_hard",
    "read_prm_records",
    "read_sft_records",
    "tokenize_prm",
    "tokenize_sft",
]
