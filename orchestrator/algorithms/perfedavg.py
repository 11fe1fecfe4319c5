"""Per-FedAvg (Fallah et al., 2020), first-order MAML, as FedBABU's ``main_per_fedavg.py`` runs it (SPEC 9.1)."""
from __future__ import annotations

import torch

from fl_sd.data import client_batches, seeded_generator
from lightning_modules.client import ClientUpdate

from . import _local
from .base import Algorithm, register_algorithm

#: Seed tag of the adaptation batch (apart from training's and fine-tuning's batches).
ADAPT_TAG = 3_000_017


@register_algorithm
class PerFedAvg(Algorithm):
    """Per-FedAvg (first-order): the round's batches are used in pairs. For each pair, from the current weights w,
    an inner SGD step on batch 1 at the round's learning rate alpha gives w' = w - alpha grad L_1(w); the gradient on
    batch 2 taken at w', grad L_2(w'), is then applied to w (not to w') by an outer SGD optimizer at ``beta``:
    w <- w - beta grad L_2(w') (the outer optimizer carries ``federation.momentum`` across pairs; the inner step is
    plain SGD). The whole model is averaged.

    A client's personalised model is the global model after one SGD step (alpha = the learning rate of the round after
    the one that produced the model, as FedBABU's code) on one batch of ITS OWN TRAINING data -- the paper's
    definition; it is what the client is evaluated with and what personalisation fine-tunes from.

    Options:
        beta: the outer (meta) learning rate, 0.1 as FedBABU's code.
        adapt_on: ``train`` (default) or ``test``. ``test`` takes the adaptation step on a batch of the client's TEST
            split: it leaks test labels into the model that is then tested and exists only to reproduce published
            numbers (FedBABU's code adapts every client on the test split of ``idx``, a leftover loop variable).

    Differences from FedBABU's code: it runs tau x (int(batches/tau) + 1) pairs per round, drawing batches round-robin
    from the loader; here every batch of the round is used once (tau x batches / 2 pairs; with an odd count the last
    batch pairs with the first). It shares one momentum SGD between the inner and the outer step, so the inner
    gradient leaks into the outer update; here the inner step is plain SGD. Its adaptation (``one_sgd_step``) takes an
    alpha step and then a beta step on two batches; here one alpha step.
    """

    name = "perfedavg"
    description = "first-order MAML: inner step on batch 1, outer step on batch 2 from the pre-inner weights"
    loss = "ce"
    train_part = "full"
    aggregate = "full"
    option_defaults = {"beta": 0.1, "adapt_on": "train"}

    @classmethod
    def validate_options(cls, options):
        super().validate_options(options)
        beta = options.get("beta", 0.1)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(f"perfedavg option beta must be a number > 0, got {beta!r}")
        if options.get("adapt_on", "train") not in ("train", "test"):
            raise ValueError(f"perfedavg option adapt_on must be train or test, got {options['adapt_on']!r}")

    def local_update(self, fed, client, batches, lr):
        module = fed.module
        module.load_state(fed.global_state)
        batches = list(batches)
        if len(batches) % 2:
            batches.append(batches[0])
        outer = _local.optimizer(fed, "full", lr)
        inner_lrs = [group["lr"] for group in outer.param_groups]  # alpha (body, head)
        for group in outer.param_groups:
            group["lr"] = float(self.options["beta"])
        params = [p for group in outer.param_groups for p in group["params"]]
        losses = []
        for b1, b2 in zip(batches[0::2], batches[1::2]):
            start = [p.detach().clone() for p in params]
            _local.backward(fed, outer, b1)
            with torch.no_grad():  # inner step, plain SGD: w' = w - alpha grad L_1(w)
                for group, alpha in zip(outer.param_groups, inner_lrs):
                    for p in group["params"]:
                        if p.grad is not None:
                            p.sub_(p.grad, alpha=alpha)
            losses.append(_local.backward(fed, outer, b2))  # grad L_2(w')
            with torch.no_grad():
                for p, w in zip(params, start):
                    p.copy_(w)
            outer.step()  # w <- w - beta grad L_2(w')
        outer.zero_grad(set_to_none=True)
        metrics = {"loss": _local.check_finite(losses)}
        return ClientUpdate(body_state=module.get_state("body"), head_state=module.get_state("head"),
                            num_samples=fed.num_train_samples(client), num_steps=len(losses), metrics=metrics)

    # -- the personalised model: one adaptation step ---------------------------------------------------------------
    @property
    def per_client_models(self) -> bool:
        return True

    def load_client_model(self, fed, client, base_state, store):
        from ..federation import load_state_

        load_state_(fed.module.net, base_state)
        # The round the base model comes from: personalisation may start from the best round's model, which must be
        # adapted as it was when it was evaluated (same batch, same learning rate), not at the last round's lr.
        round_idx = fed.best["round"] if base_state is fed.best.get("state") else fed.round
        batch = self.adaptation_batch(fed, client, round_idx)
        if batch is None:  # a client without data keeps the global model
            return
        was_training = fed.module.net.training
        _local.sgd_steps(fed, [batch], fed.lr(round_idx), part="full")  # after round r: the lr of the next round
        fed.module.net.train(was_training)

    def adaptation_batch(self, fed, client: int, round_idx: int | None = None):
        """One batch of the client's own train split (``adapt_on: test``: test split), seeded by (seed, round, client)
        for the model after ``round_idx`` rounds (default: the current one)."""
        round_idx = fed.round if round_idx is None else round_idx
        gen = seeded_generator(fed.cfg.seed, ADAPT_TAG, round_idx, client)
        bs = fed.cfg.federation.batch_size
        if self.options["adapt_on"] == "test":
            data, index, augment = fed.test_data, fed._test_index[client], False
        else:
            data, index, augment = fed.train_data, fed._train_index[client], fed.cfg.data.augment
        return next(iter(client_batches(data, index, bs, 1, gen, augment=augment)), None)
