"""Methods as plug-ins: one module per method, each registering itself (``registry.register``).

Importing this package imports every shipped method, so ``METHODS`` is complete; a new method is
one new module here plus its line below (docs/METHODS.md).
"""

# Each module registers itself on import; this order is the registry's (listings, --help, errors).
from finebench.methods import baseline  # noqa: F401, I001
from finebench.methods import attention  # noqa: F401
from finebench.methods import se  # noqa: F401
from finebench.methods import cbam  # noqa: F401
from finebench.methods import eca  # noqa: F401
from finebench.methods import bcnn  # noqa: F401
from finebench.methods import mcl  # noqa: F401
from finebench.methods import pmg  # noqa: F401
from finebench.methods import ws_dan  # noqa: F401
from finebench.methods import cal  # noqa: F401
from finebench.methods import api_net  # noqa: F401
from finebench.methods import transfg  # noqa: F401
from finebench.methods.base import Method, MethodOptions, MicroBatch, StepContext, StepResult
from finebench.methods.registry import (
    METHODS,
    build_model,
    build_model_from_config,
    get_method,
    list_methods,
    method_of,
    network_key,
    parse_options,
    register,
    variant_of_config,
)

__all__ = [
    "METHODS", "Method", "MethodOptions", "MicroBatch", "StepContext", "StepResult", "build_model",
    "build_model_from_config", "get_method", "list_methods", "method_of", "network_key", "parse_options", "register", "variant_of_config",
]
