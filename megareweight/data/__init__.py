"""Data: corpus reading and building, tokenizers, token shards, the mixture-aware sampler."""
from megareweight.data.corpus import CorpusError, iter_documents, list_domains, resolve_domains
from megareweight.data.mixture import MixtureSampler, validation_batches
from megareweight.data.permutation import KeyedPermutation
from megareweight.data.shards import PreparedData, ShardError, TokenShard, TokenStream, verify_prepared
from megareweight.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CorpusError",
    "iter_documents",
    "list_domains",
    "resolve_domains",
    "MixtureSampler",
    "validation_batches",
    "KeyedPermutation",
    "PreparedData",
    "ShardError",
    "TokenShard",
    "TokenStream",
    "verify_prepared",
    "Tokenizer",
    "load_tokenizer",
]
