"""Training SAEs: the PatchSAE recipe, resume, sweeps, DDP (``patchsae train``)."""

from patchsae.train.config import TrainConfig
from patchsae.train.trainer import train

__all__ = ["TrainConfig", "train"]
