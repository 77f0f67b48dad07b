"""Which module runs each stage: the stage names of ``stage_specs.STAGES``, each mapped to its
module under ``stages/`` (a function ``run(ctx)``), imported here by name rather than looked up
from a string, so that the import graph shows every stage and a renamed module fails at once.

The stage names are the commands and the names in the run directory; the module names say what
each stage trains (``baseline`` trains the MobileNetV2 path, ``baselines`` the reference
networks beside it).
"""

from __future__ import annotations

from types import ModuleType

from . import (
    escalation,
    evaluate,
    finetune,
    mbv2_path_baseline,
    peer,
    pretrain,
    random_policy,
    reference_baselines,
    search,
    static_child,
    variants,
)

MODULES: dict[str, ModuleType] = {
    "baseline": mbv2_path_baseline,
    "pretrain": pretrain,
    "search": search,
    "finetune": finetune,
    "escalation": escalation,
    "random-policy": random_policy,
    "static-child": static_child,
    "variants": variants,
    "baselines": reference_baselines,
    "peer": peer,
    "evaluate": evaluate,
}
