"""Federated text data: the FederatedCorpus protocol, the synthetic and Arrow corpora, ingestion.

`make_corpus(cfg)` builds the corpus named by `cfg.data` (`synthetic`, the embedded default, or
`arrow`, a folder written by `fleet-ingest`); token ids follow `fleet.learning.data.vocab`.
"""

from fleet.config import validate_data
from fleet.learning.data.corpus import FederatedCorpus, make_corpus, unigram_baseline_recall
from fleet.learning.data.vocab import BOS, EOS, NUM_SPECIAL, OOV, PAD, SPECIALS

__all__ = [
    "BOS",
    "EOS",
    "NUM_SPECIAL",
    "OOV",
    "PAD",
    "SPECIALS",
    "FederatedCorpus",
    "make_corpus",
    "unigram_baseline_recall",
    "validate_data",
]
