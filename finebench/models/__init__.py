"""Backbones, Attend and Rectify, peer plug-ins, and ``build_model`` that assembles them by name."""

from finebench.models.authors import convert_authors_state_dict, load_authors_state_dict
from finebench.models.base import Backbone, TapPoint
from finebench.models.network import ImageClassifier, parameter_groups
from finebench.models.output import ModelOutput
from finebench.models.registry import BACKBONES, VARIANTS, BackboneInfo, build_model, build_model_from_config, list_backbones

__all__ = [
    "BACKBONES",
    "VARIANTS",
    "Backbone",
    "BackboneInfo",
    "ImageClassifier",
    "ModelOutput",
    "TapPoint",
    "build_model",
    "build_model_from_config",
    "convert_authors_state_dict",
    "list_backbones",
    "load_authors_state_dict",
    "parameter_groups",
]
