"""Training SAEs: the PatchSAE recipe, resume, sweeps, DDP (``patchsae train``)."""

from patchsae.train.config import FidelityConfig, TrainConfig
from patchsae.train.trainer import train

__all__ = ["FidelityConfig", "TrainConfig", "train"]
