"""Backbones: ordered stages with per-stage feature metadata and one freeze-depth index."""

from transferlab.backbones.base import Backbone, FeatureInfo, StageInfo

__all__ = ["Backbone", "FeatureInfo", "StageInfo"]
