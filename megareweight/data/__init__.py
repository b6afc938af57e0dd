"""Data: corpus reading and building, tokenizer, token shards, the mixture-aware sampler."""
from megareweight.data.corpus import CorpusError, iter_documents, list_domains
from megareweight.data.mixture import MixtureSampler, validation_batches
from megareweight.data.shards import PreparedData, ShardError, TokenShard, verify_prepared
from megareweight.data.tokenizer import Tokenizer

__all__ = [
    "CorpusError",
    "iter_documents",
    "list_domains",
    "MixtureSampler",
    "validation_batches",
    "PreparedData",
    "ShardError",
    "TokenShard",
    "verify_prepared",
    "Tokenizer",
]
