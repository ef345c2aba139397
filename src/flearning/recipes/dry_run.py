"""``flearn update --dry-run``: an update's checks and its memory plan, without loading the weights."""

from __future__ import annotations

import logging

from flearning.config import UpdateConfig, lambda_notes
from flearning.errors import FlearnError
from flearning.recipes.update import UpdateRecipe, tokenizer_and_config

log = logging.getLogger(__name__)


def dry_run(cfg: UpdateConfig, *, processes: int = 1, available: int | None = None, sharding: str = "none"):
    """``flearn update --dry-run``: everything an update checks before training, without loading weights.

    Reads and checks the facts as the update does (one file or a split pair, conflicting edits warned
    about), loads the model's tokenizer and config (not its weights) to apply the context rule
    (``data.context``), and plans memory (``recipes.memory``) from the longest training text of the data
    in tokens; when the tokenizer cannot be loaded the plan says what it assumed instead.

    Returns:
        The ``MemoryPlan``.
    Raises:
        FlearnError: what the update would refuse before training (config, data, context).
    """
    from flearning.data.encoding import encode_pair
    from flearning.recipes.memory import dry_run_plan

    if cfg.data is None and cfg.old is None and cfg.new is None:  # a plan for a model and method alone
        for note in lambda_notes(cfg):
            log.warning(note)
        return dry_run_plan(
            cfg,
            seq_len_source="assumed: no data given (facts are short, ~10-40 tokens)",
            processes=processes,
            sharding=sharding,
            available=available,
        )
    recipe = UpdateRecipe(cfg)  # the settings, and the warnings about λ
    recipe._setup_data()
    try:
        tokenizer, model_config = tokenizer_and_config(cfg)
    except FlearnError as ex:
        reason = str(ex).splitlines()[0]
        log.warning(
            "cannot load the tokenizer of %s (%s): the data's token lengths are not checked",
            cfg.model,
            reason,
        )
        return dry_run_plan(
            cfg,
            seq_len_source=f"assumed: the tokenizer of {cfg.model} could not be loaded, so the data's lengths "
            "were not measured",
            processes=processes,
            sharding=sharding,
            available=available,
        )
    recipe._fit_context(tokenizer, model_config)
    # (with EOS?, texts): the learning stage's, or an editor's prompt + target; the forget stage's
    stages = [(recipe.plan.learn.add_eos if recipe.plan.learn else False, recipe.new_pairs)]
    if recipe.method.forget is not None:
        stages.append((recipe.plan.forget.add_eos, recipe.old_pairs))
    longest = max(
        len(encode_pair(tokenizer, prompt, target, add_eos=add_eos, template=cfg.template).input_ids)
        for add_eos, pairs in stages
        for prompt, target in pairs
    )
    return dry_run_plan(
        cfg,
        seq_len=longest,
        seq_len_source=f"the longest training text of the data, {cfg.model} tokenizer",
        processes=processes,
        sharding=sharding,
        available=available,
        requests=len(recipe.records),
    )
