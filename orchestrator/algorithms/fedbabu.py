from .base import Algorithm, register_algorithm


@register_algorithm
class FedBABU(Algorithm):
    """FedBABU: heads frozen at their random initialisation; only the body is trained and averaged."""

    name = "fedbabu"
    description = "train body (heads frozen), aggregate body"
    loss = "ce"
    train_part = "body"
    aggregate = "body"
