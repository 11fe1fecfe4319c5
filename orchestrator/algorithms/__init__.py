"""Federated algorithms, one small file each. ``get_algorithm(name)`` returns the class."""
from . import fedavg, fedbabu, fedper, mhmd  # noqa: F401  (registration)
from .base import Algorithm, get_algorithm, list_algorithms, register_algorithm

__all__ = ["Algorithm", "get_algorithm", "list_algorithms", "register_algorithm"]
