from .base import Algorithm, register_algorithm


@register_algorithm
class FedPer(Algorithm):
    """FedPer: train the whole network; the body is averaged, each client keeps its own head."""

    name = "fedper"
    description = "train all, aggregate body, heads stay local"
    loss = "ce"
    train_part = "full"
    aggregate = "body"
    keeps_part = "head"
