"""Backbones and the layers methods put on them (Attend and Rectify, SE, CBAM); ``finebench.methods``
assembles them into a model by name (``build_model``)."""

from finebench.models.authors import convert_authors_state_dict, load_authors_state_dict
from finebench.models.base import Backbone, TapPoint
from finebench.models.network import ImageClassifier, parameter_groups
from finebench.models.output import ModelOutput
from finebench.models.registry import BACKBONES, BackboneInfo, list_backbones

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneInfo",
    "ImageClassifier",
    "ModelOutput",
    "TapPoint",
    "convert_authors_state_dict",
    "list_backbones",
    "load_authors_state_dict",
    "parameter_groups",
]
