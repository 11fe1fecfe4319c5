from .base import Algorithm, register_algorithm


@register_algorithm
class FedAvg(Algorithm):
    """FedAvg: train the whole network locally, average all of it (FedBABU's `full/full`)."""

    name = "fedavg"
    description = "train all, aggregate all"
    loss = "ce"
    train_part = "full"
    aggregate = "full"
