"""fl-sd: personalised federated learning with Multi-Head Mutual-Distillation (MHMD) on FedBABU.

Plain PyTorch: models, losses, data sources, partitions. Knows nothing of Lightning or of federation.
"""
__version__ = "0.1.0"
