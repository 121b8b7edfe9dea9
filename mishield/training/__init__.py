"""Training: the TTS / finetune schedule, BiDO, the shared loop and its resumable state.

    recipe.py     TrainingRecipe, SCHEDULES, default_lr
    state.py      the one resumable-state format (atomic, versioned, fingerprinted)
    interrupt.py  divergence, Ctrl-C (exit 130) and SIGTERM (exit 143) stops
    loop.py       TrainStep, epochs of a stage, fit, RunOptions, evaluate_accuracy
    schedule.py   run_schedule (TTS / finetune stages), reset_head
    bido.py       BiDO's HSIC terms and feature taps
    smoothing.py  (negative) label smoothing and its epoch schedule
    freezing.py   partial freezing of the stem and first stages (TL-DMI)
    transfer.py   TL-DMI's public pre-training, then frozen private fine-tuning
    log.py        the JSON-lines training log
    prior.py      the DCGAN image prior, trained on public data (mishield prior train)
    distillation.py  surrogates distilled from a target (mishield surrogate train)
    evaluator.py  the audit's evaluation model (mishield train-eval)
"""

from mishield.training.bido import (
    BiDOConfig,
    FeatureTap,
    bido_loss,
    bido_terms,
    find_feature_modules,
)
from mishield.training.freezing import (
    FreezePlan,
    FrozenStages,
    find_stages,
    plan_freeze,
)
from mishield.training.interrupt import (
    TrainingDiverged,
    TrainingInterrupted,
    TrainingPreempted,
    preemptible,
)
from mishield.training.log import JsonlLog
from mishield.training.loop import (
    EpochRecord,
    FitResult,
    RunOptions,
    TrainStep,
    evaluate_accuracy,
    fit,
)
from mishield.training.recipe import (
    MIDRE_ERASE,
    RECIPE_LR,
    SCHEDULES,
    TRAINED_CHECKPOINT_LR,
    TrainingRecipe,
    default_lr,
)
from mishield.training.schedule import ScheduleResult, reset_head, run_schedule
from mishield.training.smoothing import (
    NEGATIVE_ALPHA,
    LabelSmoothing,
    smoothed_cross_entropy,
    smoothing_factor,
)
from mishield.training.state import (
    STATE_FORMAT,
    STATE_VERSION,
    load_state,
    save_state,
    state_path_for,
)
from mishield.training.transfer import (
    PublicPretraining,
    TLDMIResult,
    pretrain_on_public,
    train_tl_dmi,
)

__all__ = [
    "MIDRE_ERASE",
    "NEGATIVE_ALPHA",
    "RECIPE_LR",
    "SCHEDULES",
    "STATE_FORMAT",
    "STATE_VERSION",
    "TRAINED_CHECKPOINT_LR",
    "BiDOConfig",
    "EpochRecord",
    "FeatureTap",
    "FitResult",
    "FreezePlan",
    "FrozenStages",
    "JsonlLog",
    "LabelSmoothing",
    "PublicPretraining",
    "RunOptions",
    "ScheduleResult",
    "TLDMIResult",
    "TrainStep",
    "TrainingDiverged",
    "TrainingInterrupted",
    "TrainingPreempted",
    "TrainingRecipe",
    "bido_loss",
    "bido_terms",
    "default_lr",
    "evaluate_accuracy",
    "find_feature_modules",
    "find_stages",
    "fit",
    "load_state",
    "plan_freeze",
    "preemptible",
    "pretrain_on_public",
    "reset_head",
    "run_schedule",
    "save_state",
    "smoothed_cross_entropy",
    "smoothing_factor",
    "state_path_for",
    "train_tl_dmi",
]
