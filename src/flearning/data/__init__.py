"""Knowledge data: one record type, loaders for ZsRE, CounterFact and the user's own JSONL facts."""

from flearning.data.records import KnowledgeRecord, PromptAnswer

__all__ = ["KnowledgeRecord", "PromptAnswer"]
