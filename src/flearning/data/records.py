"""The one record type every dataset is mapped to.

Every loader (zsRE, CounterFact, JSONL) produces ``KnowledgeRecord``s; training stages take their
``old_pair`` (prime, forget) or ``new_pair`` (learn), evaluation takes the records themselves.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer


class PromptAnswer(BaseModel):
    """A prompt with the answer expected after it (locality and portability probes).

    ``category`` names the group a probe belongs to in files that group them (KnowEdit:
    ``{"Relation_Specificity": [...], "Forgetfulness": [...]}``); the metrics average within each
    category, then over categories. None (every other shape) is one implicit category; it is left out
    when the probe is dumped, so records without categories serialise and hash as before.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    answer: str
    category: str | None = None

    @model_serializer(mode="wrap")
    def _without_empty_category(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("category") is None:
            data.pop("category", None)
        return data


class KnowledgeRecord(BaseModel):
    """One fact to update: ``prompt`` used to be completed by ``target_old``, now by ``target_new``.

    The text fed to the model is always ``prompt + " " + target`` (EasyEdit convention); targets are
    stored without leading/trailing white space.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    prompt: str
    target_old: str
    target_new: str
    subject: str | None = None
    rephrase_prompts: list[str] = Field(default_factory=list)
    locality: list[PromptAnswer] = Field(default_factory=list)
    portability: list[PromptAnswer] = Field(default_factory=list)

    @property
    def old_pair(self) -> tuple[str, str]:
        """(prompt, target_old): what priming and the forget stage train on."""
        return (self.prompt, self.target_old)

    @property
    def new_pair(self) -> tuple[str, str]:
        """(prompt, target_new): what the learning stage trains on."""
        return (self.prompt, self.target_new)
