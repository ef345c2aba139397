"""Every run configuration, its names re-exported here: ``config.stages`` (what update and bench share:
stage defaults, overrides, the stop rule, ``StagePlan``), ``config.update`` (``flearn update``'s
``UpdateConfig`` and ``stage_plan``), ``config.bench`` (``flearn bench``'s ``BenchConfig``, its datasets
and profiles, and the priming settings ``flearn prime`` shares with it), ``config.edit`` (the editors'
``edit:`` section) and ``config.loading`` (the loader).

``load_config`` layers (profile) < YAML file < command-line options < ``key=value`` overrides and reports
every problem at once, as ``source:field: what is wrong``. ``stage_plan`` turns an update config into the
stages' ``TrainConfig``s (``BenchConfig.stage_plan`` for the bench). Every default (stage
hyper-parameters, ε, priming, datasets) is stated once, in those modules; the default model is
``models.DEFAULT_MODEL``.
"""

from __future__ import annotations

from flearning.config.bench import (
    DATA_ENV as DATA_ENV,
)
from flearning.config.bench import (
    DEFAULT_DATA_ROOT as DEFAULT_DATA_ROOT,
)
from flearning.config.bench import (
    FULL_DATA as FULL_DATA,
)
from flearning.config.bench import (
    PAPER_STAGE as PAPER_STAGE,
)
from flearning.config.bench import (
    PAPER_V2 as PAPER_V2,
)
from flearning.config.bench import (
    PROFILES as PROFILES,
)
from flearning.config.bench import (
    RESERVED_NAMES as RESERVED_NAMES,
)
from flearning.config.bench import (
    SAMPLE_DATA as SAMPLE_DATA,
)
from flearning.config.bench import (
    BenchConfig as BenchConfig,
)
from flearning.config.bench import (
    Lambdas as Lambdas,
)
from flearning.config.bench import (
    PrimeOptions as PrimeOptions,
)
from flearning.config.bench import (
    PrimeSettings as PrimeSettings,
)
from flearning.config.bench import (
    Seed as Seed,
)
from flearning.config.bench import (
    _auto_or_numbers as _auto_or_numbers,
)
from flearning.config.bench import (
    _lambdas_schema as _lambdas_schema,
)
from flearning.config.bench import (
    data_root as data_root,
)
from flearning.config.bench import (
    default_data as default_data,
)
from flearning.config.bench import (
    full_data as full_data,
)
from flearning.config.bench import (
    negative_lambda as negative_lambda,
)
from flearning.config.bench import (
    sample_data as sample_data,
)
from flearning.config.edit import (
    EditPlan as EditPlan,
)
from flearning.config.edit import (
    EditSettings as EditSettings,
)
from flearning.config.edit import (
    edit_plan as edit_plan,
)
from flearning.config.loading import (
    build_config as build_config,
)
from flearning.config.loading import (
    config_source as config_source,
)
from flearning.config.loading import (
    load_config as load_config,
)
from flearning.config.loading import (
    parse_overrides as parse_overrides,
)
from flearning.config.loading import (
    read_yaml as read_yaml,
)
from flearning.config.loading import (
    resolve_config_paths as resolve_config_paths,
)
from flearning.config.stages import (
    FULL_STAGE as FULL_STAGE,
)
from flearning.config.stages import (
    LINF_BOUND as LINF_BOUND,
)
from flearning.config.stages import (
    LOCALITY_PROBES as LOCALITY_PROBES,
)
from flearning.config.stages import (
    LORA_STAGE as LORA_STAGE,
)
from flearning.config.stages import (
    MAX_EPOCHS as MAX_EPOCHS,
)
from flearning.config.stages import (
    STOP_FIELDS as STOP_FIELDS,
)
from flearning.config.stages import (
    TRACKERS as TRACKERS,
)
from flearning.config.stages import (
    UNTIL_ACCURACY as UNTIL_ACCURACY,
)
from flearning.config.stages import (
    LearnOverrides as LearnOverrides,
)
from flearning.config.stages import (
    PerplexitySettings as PerplexitySettings,
)
from flearning.config.stages import (
    ReportTo as ReportTo,
)
from flearning.config.stages import (
    RunName as RunName,
)
from flearning.config.stages import (
    StageOverrides as StageOverrides,
)
from flearning.config.stages import (
    StagePlan as StagePlan,
)
from flearning.config.stages import (
    StopRule as StopRule,
)
from flearning.config.stages import (
    TrackerName as TrackerName,
)
from flearning.config.stages import (
    _run_name as _run_name,
)
from flearning.config.stages import (
    _shipped_sample as _shipped_sample,
)
from flearning.config.stages import (
    _tracker_list as _tracker_list,
)
from flearning.config.stages import (
    default_stage as default_stage,
)
from flearning.config.stages import (
    field_mapping as field_mapping,
)
from flearning.config.stages import (
    learn_config as learn_config,
)
from flearning.config.stages import (
    template_problem as template_problem,
)
from flearning.config.update import (
    UpdateConfig as UpdateConfig,
)
from flearning.config.update import (
    lambda_notes as lambda_notes,
)
from flearning.config.update import (
    learn_stop_rule as learn_stop_rule,
)
from flearning.config.update import (
    stage_plan as stage_plan,
)
