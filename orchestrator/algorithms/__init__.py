"""Federated algorithms, one small file each. ``get_algorithm(name)`` returns the class."""
from . import ditto, fedavg, fedbabu, fedper, fedrep, lg_fedavg, mhmd, perfedavg  # noqa: F401  (registration)
from .base import Algorithm, get_algorithm, list_algorithms, register_algorithm

__all__ = ["Algorithm", "get_algorithm", "list_algorithms", "register_algorithm"]
