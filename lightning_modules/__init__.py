"""Lightning modules that train DASH-KV hash encoders: ``lightning fit --config recipes/smollm2.yaml``."""

from .data import LongTextDataModule
from .distillation import DashKVDistillation
from .export import ExportEncoders

__all__ = ["DashKVDistillation", "ExportEncoders", "LongTextDataModule"]
