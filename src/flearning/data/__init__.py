"""Knowledge data: one record type, loaders for ZsRE, CounterFact and the user's own JSONL facts."""

from flearning.data.formats import FORMATS
from flearning.data.loading import DROP_REASONS, LoadedDataset, load_dataset, load_records
from flearning.data.records import KnowledgeRecord, PromptAnswer
from flearning.data.store import records_hash, save_jsonl

__all__ = [
    "DROP_REASONS",
    "FORMATS",
    "KnowledgeRecord",
    "LoadedDataset",
    "PromptAnswer",
    "load_dataset",
    "load_records",
    "records_hash",
    "save_jsonl",
]
