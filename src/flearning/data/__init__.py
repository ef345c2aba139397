"""Knowledge data: one record type (``KnowledgeRecord``) and the loaders that map ZsRE, CounterFact
(EasyEdit and ROME layouts) and the user's own JSONL facts onto it; an update's facts from one file or a
split pair (``joining``); the rule for inputs longer than the model's context (``context``).

Training and evaluation only ever see records, never a file's layout. The formats, their detection, the
drop rules and the error messages are documented in the samples' README (``data/README.md``).
"""

from flearning.data.combined import CombinedDataset, load_combined
from flearning.data.formats import FORMATS
from flearning.data.joining import UpdateData, load_update_data
from flearning.data.loading import DROP_REASONS, LoadedDataset, Location, load_dataset, load_records
from flearning.data.records import KnowledgeRecord, PromptAnswer
from flearning.data.store import records_hash, save_jsonl

__all__ = [
    "DROP_REASONS",
    "FORMATS",
    "KnowledgeRecord",
    "CombinedDataset",
    "LoadedDataset",
    "Location",
    "PromptAnswer",
    "UpdateData",
    "load_combined",
    "load_dataset",
    "load_records",
    "load_update_data",
    "records_hash",
    "save_jsonl",
]
