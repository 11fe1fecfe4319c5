"""Federated algorithms, one small file each. ``get_algorithm(name)`` returns the class."""
from . import ditto, fedavg, fedbabu, fedper, fedrep, lg_fedavg, mhmd, mhmd_plus, perfedavg  # noqa: F401  (registration)
from .base import (Algorithm, AlgorithmOptions, get_algorithm, list_algorithms, register_algorithm,
                   unregister_algorithm)
from .context import PARTS, ClientContext, ClientJob, ServerContext

__all__ = ["Algorithm", "AlgorithmOptions", "ClientContext", "ClientJob", "PARTS", "ServerContext", "get_algorithm",
           "list_algorithms", "register_algorithm", "unregister_algorithm"]
