"""Multi-head models. ``create_model(name, num_classes=K, **options)`` builds any registered architecture."""
from . import cnn, mobilenet, resnet  # noqa: F401  (registration side effects)
from .base import (HEAD_LAYOUTS, HEAD_PIECES, AuxHead, MultiHeadNet, MultiHeadOutput, Scaler, ScalerAuxHead,
                   head_piece_rows, use_channels_last)
from .registry import create_model, list_models, model_entry, register_model

__all__ = ["AuxHead", "HEAD_LAYOUTS", "HEAD_PIECES", "MultiHeadNet", "MultiHeadOutput", "Scaler", "ScalerAuxHead",
           "create_model", "head_piece_rows", "list_models", "model_entry", "register_model",
           "use_channels_last"]
