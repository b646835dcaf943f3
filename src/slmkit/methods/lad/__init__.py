"""Length-Adaptive Distillation (Liu et al., Findings of EMNLP 2023): a small encoder trained to stay
accurate while it drops tokens layer by layer.

Token pruning (the Length-Adaptive Transformer): each layer keeps the tokens that receive the most attention
([CLS] always), as many as a per-layer length configuration says. LAD distils the student *under* sampled
length configurations in two stages -- general (align the full student, and the pruned student on its kept
tokens, to the teacher; reconstruct the teacher's output from the pruned states through a teacher layer) and
task-specific (pruned sub-models matched to the fine-tuned teacher) -- then an evolutionary search picks
length configurations on the accuracy / FLOPs frontier. The baseline: a normally distilled student, pruned at
inference only. ``slm lad CONFIG.yaml`` runs both.
"""

from . import tasks  # noqa: F401  (registers lad_general and lad_task)
from .experiment import LADConfig, config_from_mapping, load_config, run, tables

__all__ = ["LADConfig", "config_from_mapping", "load_config", "run", "tables"]
