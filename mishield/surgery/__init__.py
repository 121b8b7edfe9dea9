"""Architecture surgery: find a model's skip connections (`skips`), plan which ones a method
changes and apply RoLSS or SSF to a copy (`plan`; the methods and their validation: `methods`),
and the rewritten model type (`rewired`).

    analysis = analyse(model, (3, 224, 224))     # every SkipSite and Stage
    plan = plan_surgery(model, "rolss")          # which sites change, nothing touched yet
    result = apply_plan(model, plan)             # a rewritten copy; `model` is left as it was
"""

from mishield.surgery.methods import DEFAULT_SSF_ALPHA, METHODS, check_method
from mishield.surgery.plan import (
    SkipScale,
    SurgeryPlan,
    SurgeryResult,
    apply_plan,
    plan_surgery,
    rebuild,
)
from mishield.surgery.rewired import SkipRewiredModel
from mishield.surgery.skips import SkipAnalysis, SkipSite, Stage, analyse

__all__ = [
    "DEFAULT_SSF_ALPHA",
    "METHODS",
    "SkipAnalysis",
    "SkipRewiredModel",
    "SkipScale",
    "SkipSite",
    "Stage",
    "SurgeryPlan",
    "SurgeryResult",
    "analyse",
    "apply_plan",
    "check_method",
    "plan_surgery",
    "rebuild",
]
