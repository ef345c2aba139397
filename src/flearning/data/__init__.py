"""Knowledge data: one record type (``KnowledgeRecord``) and the loaders that map ZsRE, CounterFact
(EasyEdit and ROME layouts) and the user's own JSONL facts onto it.

Training and evaluation only ever see records, never a file's layout. The formats, their detection, the
drop rules and the error messages are documented in the samples' README (``data/README.md``).
"""

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
