"""Beyond the paper: MHMD whose auxiliary heads (or only their temperature rows) learn during federated training.

In MHMD (as in the reference) the auxiliary heads and their temperature rows are head parameters, so during federated
training they stay at their random initialisation: the "learned per-sample temperature" is a fixed random projection
of the body's features until fine-tuning. These variants train a piece of the head locally together with the body and
let the server average it with the body, while the final head stays frozen as in FedBABU:

* ``mhmd_aux``: the auxiliary heads, class rows and temperature rows;
* ``mhmd_temp``: only the temperature rows (the auxiliary class rows stay frozen too).

A detached teacher (no gradient into the teacher side of the distillation terms) is the loss option
``--algorithm.loss_options.detach_teacher true``, with any of them. The pieces come from the model's declaration
(``fl_sd.models.head_piece_rows``); the head's pieces train at ``federation.head_lr`` (default: the body's lr).
"""
from __future__ import annotations

from typing import ClassVar

from fl_sd.hooks import StepOnly
from fl_sd.models import head_piece_rows

from .base import overlay, register_algorithm
from .mhmd import MHMD


class MHMDWithHeadPiece(MHMD):
    """MHMD + one piece of the head (``head_piece``) trained and averaged with the body; the rest stays frozen."""

    #: the piece of the head that trains locally and is averaged with the body (fl_sd.models.HEAD_PIECES)
    head_piece: ClassVar[str] = "aux_heads"
    #: the body trains and is averaged as in FedBABU / MHMD; ``head_piece`` comes on top
    train_part = "body"
    aggregate = "body"

    def shared_keys(self, body_keys, head_keys):
        return [*body_keys, *head_piece_rows(self.head_piece, head_keys)]

    @property
    def returns_head(self) -> bool:
        return True

    def client_update(self, ctx, job, global_state, batches):
        steps = {k: None for k in ctx.part_keys("body")}
        steps.update(head_piece_rows(self.head_piece, ctx.part_keys("head")))
        update = ctx.train(batches, start=overlay(global_state, job.own_state), part="full", lr=job.lr,
                           loss=ctx.train_loss, hooks=StepOnly(steps), return_head=True,
                           num_samples=ctx.num_train_samples(job.client))
        return update, None

    def shared_state(self, update):
        piece = head_piece_rows(self.head_piece, update.head_state)
        return {**update.body_state, **{k: update.head_state[k] for k in piece}}

    def apply_aggregate(self, global_state, averaged):
        rows = head_piece_rows(self.head_piece, averaged)
        for key, value in averaged.items():
            where = rows.get(key)
            if where is None:
                global_state[key].copy_(value)
            else:  # only the piece's rows: the others are the same frozen values in every client
                global_state[key][where] = value[where]


@register_algorithm
class MHMDAux(MHMDWithHeadPiece):
    name = "mhmd_aux"
    description = "MHMD + auxiliary heads (and temperature rows) trained and averaged with the body; final head frozen"
    head_piece = "aux_heads"


@register_algorithm
class MHMDTemp(MHMDWithHeadPiece):
    name = "mhmd_temp"
    description = "MHMD + only the auxiliary heads' temperature rows trained and averaged with the body"
    head_piece = "temperature"
