"""Recovery of compressed models by expert-wise knowledge distillation from the base model."""

from moeviz.recovery.distill import DistillationSession, RecoveryError, RecoveryResult, RecoverySettings, recover
from moeviz.recovery.run import gap_recovered, recover_and_evaluate, recovery_label

__all__ = ["DistillationSession", "RecoveryError", "RecoveryResult", "RecoverySettings", "gap_recovered",
           "recover", "recover_and_evaluate", "recovery_label"]
