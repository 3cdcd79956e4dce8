"""Methods as plug-ins: one module per method, each registering itself (``registry.register``).

Importing this package imports every module in it (``registry.discover``), so ``METHODS`` is
complete; a new method is one new module here (docs/METHODS.md).
"""

from finebench.methods.base import (
    Method,
    MethodOptions,
    MicroBatch,
    StepContext,
    StepResult,
)
from finebench.methods.registry import (
    METHODS,
    build_model,
    build_model_from_config,
    discover,
    get_method,
    list_methods,
    method_of,
    network_key,
    parse_options,
    register,
    variant_of_config,
)

discover()

__all__ = [
    "METHODS", "Method", "MethodOptions", "MicroBatch", "StepContext", "StepResult", "build_model",
    "build_model_from_config", "get_method", "list_methods", "method_of", "network_key", "parse_options", "register", "variant_of_config",
]
