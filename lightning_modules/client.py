"""The client: a LightningModule = multi-head network + MHMD loss + which parts train.

Two ways to use :class:`MultiHeadClassifier`:

* **Standalone**, centrally: ``pl.Trainer(...).fit(module, datamodule)`` trains any registered multi-head image
  classifier with multi-head self-/mutual distillation. ``training_step``/``validation_step``/``test_step`` log the loss
  and its parts, the accuracy of every head (torchmetrics) and the mean learned temperature of every auxiliary head.
* **Federated**, as one client update: :meth:`MultiHeadClassifier.local_update` loads a body (and optionally a head)
  state into the module *in place*, runs one SGD step per given batch with a fresh optimizer (momentum reset, as the
  reference) and returns a :class:`ClientUpdate`. It needs no ``Trainer``, builds no ``DataLoader``, copies no model,
  and synchronises with the device once, at the end. The same module object serves every client in turn.

Freezing (SPEC 2.4): the reference gives frozen parts learning rate 0 (SGD, momentum 0.9, weight decay 0: they never
change, even with weight decay, since the update is scaled by lr). Here frozen parameters get ``requires_grad=False``
and stay out of the optimizer: the same result, without computing or storing their gradients. Gradients still flow
*through* frozen heads into the body (the activations require grad). Both the ``Trainer`` path
(:meth:`~MultiHeadClassifier.configure_optimizers`) and :meth:`~MultiHeadClassifier.local_update` use the same rule
(:meth:`~MultiHeadClassifier.param_groups`).

BatchNorm running statistics are buffers of the body; they update whenever the network runs in train mode, whatever
parts train -- also in ``head`` fine-tuning, as the reference does. They are part of ``ClientUpdate.body_state``.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from fl_sd.hooks import StepHooks
from fl_sd.losses import PRESETS, LossConfig, LossOutput, MultiHeadLoss, loss_config
from fl_sd.models import MultiHeadNet, MultiHeadOutput, create_model, list_models, model_entry

#: What trains: ``body`` (heads frozen; FedBABU/MHMD federated training), ``head`` (body frozen), ``full``.
TRAIN_PARTS = ("body", "head", "full")

#: Names of the loss parts, in :class:`~fl_sd.losses.LossOutput` order (``loss`` is the total).
LOSS_PARTS = ("loss", "loss_ce_final", "loss_ce_aux", "loss_kd_self", "loss_kd_mutual")


class NonFiniteLossError(FloatingPointError):
    """A local update produced a NaN/Inf loss. ``step`` is the 1-based index of the first bad step."""

    def __init__(self, step: int, num_steps: int, value: float):
        self.step, self.num_steps, self.value = step, num_steps, value
        super().__init__(f"non-finite loss ({value}) at step {step} of {num_steps} of the local update; "
                         "the run diverged (lower the learning rate) or the batch holds NaN/Inf values")


@dataclass
class ClientUpdate:
    """The result of one :meth:`MultiHeadClassifier.local_update`.

    body_state: detached clones of the body's state after the update (parameters and buffers, e.g. BN running stats),
        keyed like ``net.state_dict()``.
    head_state: the same for the heads when ``return_head=True``, else ``None``.
    num_samples: the ``num_samples=`` given to ``local_update`` (e.g. the client's dataset size), else the total
        number of samples processed (sum of batch sizes over all steps, i.e. epochs x dataset size).
    num_steps: optimizer steps taken.
    metrics: mean over steps of ``loss`` and its parts (``loss_ce_final``, ``loss_ce_aux``, ``loss_kd_self``,
        ``loss_kd_mutual``); training accuracy (fraction of processed samples) of the final head ``acc_final`` and of
        each auxiliary head ``acc_aux{l}``; mean learned temperature sigmoid(s) of each auxiliary head ``temp_aux{l}``.
    """

    body_state: dict[str, Tensor]
    head_state: dict[str, Tensor] | None
    num_samples: int
    num_steps: int
    metrics: dict[str, float] = field(default_factory=dict)


def _registered_name(net: nn.Module) -> str | None:
    """The registry name whose builder is ``type(net)``, if any (to find its default loss weights)."""
    for name in list_models():
        if model_entry(name).builder is type(net):
            return name
    return None


def build_loss_config(loss: str | LossConfig = "mhmd", loss_options: Mapping[str, Any] | None = None,
                      model: str | None = None) -> LossConfig:
    """Resolve the loss: the model's registered default weights (SPEC "Decisions": e.g. aux 0.01 for ``cnn4``), then
    the preset's own settings, then ``loss_options``. A :class:`LossConfig` instance is used as it is."""
    if isinstance(loss, LossConfig):
        if loss_options:
            raise ValueError("loss_options cannot be combined with a LossConfig instance; put them in the LossConfig")
        return loss
    if loss not in PRESETS:
        raise ValueError(f"unknown loss preset {loss!r}; choose one of {sorted(PRESETS)}")
    defaults = dict(model_entry(model).default_loss) if model is not None else {}
    overrides = {k: v for k, v in defaults.items() if k not in PRESETS[loss]}
    overrides.update(loss_options or {})
    return loss_config(loss, **overrides)


class MultiHeadClassifier(pl.LightningModule):
    """A multi-head classifier trained with the MHMD loss; see the module docstring.

    Args:
        model: registered model name (``fl_sd.models.list_models()``), ignored when ``net`` is given.
        num_classes: K, ignored when ``net`` is given.
        model_options: extra keyword arguments of the model builder (e.g. ``{"track_running_stats": False}``).
        loss: a loss preset name (``mhmd``, ``ce``, ``no_scaler``, ``ungated``, ``coarse_gated``, ``one_way``) or a
            :class:`~fl_sd.losses.LossConfig`. Preset names start from the model's registered default weights.
        loss_options: :class:`~fl_sd.losses.LossConfig` field overrides (``aux_weight``, ``kd_weight``, ...).
        train_part: ``body`` (heads frozen), ``head`` (body frozen) or ``full``.
        lr: learning rate of the body. head_lr: learning rate of the heads (``None``: ``lr``).
        momentum, weight_decay: SGD settings (both parameter groups).
        lr_milestones, lr_gamma: optional ``MultiStepLR`` epochs for the standalone Trainer path.
        net: a prebuilt :class:`~fl_sd.models.MultiHeadNet` (then ``model``/``num_classes``/``model_options`` are
            ignored and the loss defaults come from the net's registered class, if any).
    """

    def __init__(self, model: str = "mobilenet", num_classes: int = 100, model_options: dict | None = None,
                 loss: str | LossConfig = "mhmd", loss_options: dict | None = None, train_part: str = "full",
                 lr: float = 0.1, head_lr: float | None = None, momentum: float = 0.9, weight_decay: float = 0.0,
                 lr_milestones: list[int] | None = None, lr_gamma: float = 0.1, net: MultiHeadNet | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        if net is None:
            net = create_model(model, num_classes=num_classes, **(model_options or {}))
            model_name = model
        else:
            if not isinstance(net, MultiHeadNet):
                raise TypeError(f"net must be a fl_sd.models.MultiHeadNet, got {type(net).__name__}")
            model_name = _registered_name(net)
            # What a checkpoint needs to rebuild this very network (load_from_checkpoint), not the defaults above.
            self.hparams.update(model=model_name, num_classes=net.num_classes, model_options=net.build_options())
        self.net = net
        self.loss_fn = MultiHeadLoss(build_loss_config(loss, loss_options, model_name))
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.lr_milestones = list(lr_milestones or [])
        self.lr_gamma = float(lr_gamma)
        self.train_part = train_part
        self.lr = float(lr)
        self.head_lr: float | None = None
        self.set_train_part(train_part, lr=lr, head_lr=head_lr)

        k, n_aux = net.num_classes, net.num_aux_heads
        self.head_names = ("final",) + tuple(f"aux{i}" for i in range(n_aux))
        #: Names of the loss parts and mean temperatures, in the order of ``_loss_temp_values``.
        self.value_names = LOSS_PARTS + tuple(f"temp_aux{i}" for i in range(n_aux))
        # One accuracy metric per head per stage (micro average = fraction of correct samples).
        self.head_metrics = nn.ModuleDict({
            f"{stage}_acc": nn.ModuleDict({h: MulticlassAccuracy(k, average="micro", validate_args=False)
                                           for h in self.head_names})
            for stage in ("train", "val", "test")})
        self._state_cache: dict[str, Tensor] | None = None
        self._epoch_sums: dict[str, Tensor] = {}
        self._epoch_counts: dict[str, int] = {}

    # ---- network / loss --------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> MultiHeadOutput:
        return self.net(x)

    def compute_loss(self, batch) -> tuple[LossOutput, MultiHeadOutput]:
        """Forward one ``(images, labels)`` batch and return (loss and its parts, network output)."""
        x, y = batch
        out = self.net(x)
        return self.loss_fn(out, y), out

    # ---- which parts train ------------------------------------------------------------------------------------------
    @property
    def effective_head_lr(self) -> float:
        return self.lr if self.head_lr is None else self.head_lr

    def set_train_part(self, part: str, lr: float | None = None, head_lr: float | None = None) -> None:
        """Choose what trains and (optionally) the learning rates; frozen parameters get ``requires_grad=False``.

        ``lr`` given without ``head_lr`` makes the head learning rate follow ``lr`` again.
        """
        if part not in TRAIN_PARTS:
            raise ValueError(f"train_part must be one of {TRAIN_PARTS}, got {part!r}")
        if lr is not None:
            if lr < 0:
                raise ValueError(f"lr must be >= 0, got {lr}")
            self.lr = float(lr)
            self.head_lr = None
        if head_lr is not None:
            if head_lr < 0:
                raise ValueError(f"head_lr must be >= 0, got {head_lr}")
            self.head_lr = float(head_lr)
        self._freeze_except(part)
        self.train_part = part

    def param_groups(self) -> list[dict]:
        """SGD parameter groups of the trainable parts: ``body`` at ``lr``, ``head`` at ``head_lr``."""
        return self._param_groups(self.train_part, self.lr, self.effective_head_lr)

    def make_optimizer(self) -> torch.optim.SGD:
        return torch.optim.SGD(self.param_groups(), lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)

    def configure_optimizers(self):
        optimizer = self.make_optimizer()
        if not self.lr_milestones:
            return optimizer
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.lr_milestones, self.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ---- Trainer steps ----------------------------------------------------------------------------------------------
    def _shared_step(self, batch, stage: str) -> Tensor:
        # Per step: update the accuracy metrics and one on-device running sum; log once per epoch (a self.log call
        # per value per step costs ~0.5 ms of Python each, more than a GPU step of a small CIFAR network).
        losses, out = self.compute_loss(batch)
        y = batch[1]
        metrics = self.head_metrics[f"{stage}_acc"]
        for name, logits in zip(self.head_names, (out.final, *out.aux)):
            metrics[name].update(logits.detach(), y)
        weighted = self._loss_temp_values(losses, out) * y.shape[0]
        running = self._epoch_sums.get(stage)
        self._epoch_sums[stage] = weighted if running is None else running + weighted
        self._epoch_counts[stage] = self._epoch_counts.get(stage, 0) + y.shape[0]
        return losses.total

    def _log_epoch(self, stage: str) -> None:
        """Log the epoch means of the loss parts and temperatures and the accuracy of every head; reset them."""
        sums, count = self._epoch_sums.pop(stage, None), self._epoch_counts.pop(stage, 0)
        metrics = self.head_metrics[f"{stage}_acc"]
        if sums is None or count == 0:
            for metric in metrics.values():
                metric.reset()
            return
        sync = self._trainer is not None and self.trainer.world_size > 1
        means = sums / count
        for i, name in enumerate(self.value_names):
            self.log(f"{stage}/{name}", means[i], sync_dist=sync, prog_bar=(name == "loss"))
        for name, metric in metrics.items():
            self.log(f"{stage}/acc_{name}", metric.compute(), prog_bar=(name == "final" and stage != "train"))
            metric.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.net(x).final

    # ---- federated API ---------------------------------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() may replace buffer tensors: drop the cached references.
        self._state_cache = None
        return super()._apply(fn, *args, **kwargs)

    def _state_refs(self) -> dict[str, Tensor]:
        """The network's live state tensors (parameters and persistent buffers) by ``state_dict`` key, cached."""
        if self._state_cache is None:
            self._state_cache = {k: v for k, v in self.net.state_dict(keep_vars=True).items()}
            self._body_keys = tuple(self.net.body_state_keys())
            self._head_keys = tuple(self.net.head_state_keys())
        return self._state_cache

    def _part_keys(self, part: str | None) -> tuple[str, ...]:
        refs = self._state_refs()
        if part is None or part == "full":
            return tuple(refs)
        if part == "body":
            return self._body_keys
        if part == "head":
            return self._head_keys
        raise ValueError(f"unknown model part {part!r}; choose body, head or full")

    @torch.no_grad()
    def load_state(self, state: Mapping[str, Tensor], part: str | None = None) -> None:
        """Copy ``state`` into the network in place (``Tensor.copy_``: same tensors, no new module).

        ``part`` (``body``/``head``/``full``) restricts the allowed keys. Keys missing from ``state`` keep their values.
        """
        refs = self._state_refs()
        allowed = set(self._part_keys(part))
        dst, src = [], []
        for key, value in state.items():
            if key not in allowed:
                where = f"{part} " if part else ""
                raise KeyError(f"{key!r} is not a {where}state key of {type(self.net).__name__}")
            target = refs[key]
            if target.shape != value.shape:
                raise ValueError(f"state {key!r}: shape {tuple(value.shape)} does not match {tuple(target.shape)}")
            dst.append(target)
            src.append(value)
        for d, s in zip(dst, src):
            d.copy_(s)

    @torch.no_grad()
    def get_state(self, part: str = "body") -> dict[str, Tensor]:
        """Detached clones of the ``body``, ``head`` or ``full`` state (parameters and buffers)."""
        refs = self._state_refs()
        return {k: refs[k].detach().clone() for k in self._part_keys(part)}

    def local_update(self, batches: Iterable[tuple[Tensor, Tensor]], *, state: Mapping[str, Tensor] | None = None,
                     body_state: Mapping[str, Tensor] | None = None, head_state: Mapping[str, Tensor] | None = None,
                     train_part: str | None = None, lr: float | None = None, head_lr: float | None = None,
                     loss: LossConfig | MultiHeadLoss | None = None, hooks: StepHooks | None = None,
                     return_head: bool = False, num_samples: int | None = None,
                     on_epoch_end: Callable[[int], None] | None = None,
                     steps_per_epoch: int | None = None, autocast: torch.autocast | None = None,
                     momentum: float | None = None) -> ClientUpdate:
        """One client update: load states in place, one SGD step per ``(x, y)`` in ``batches``, return the result.

        ``state`` (any state-dict keys, e.g. a whole model), then ``body_state`` and ``head_state`` are copied into the
        network first. ``batches`` already holds every local epoch (e.g. tau x 10 batches of 50); tensors are moved to
        the module's device if they are not there yet (a no-op when they are).

        This call's settings -- ``train_part``, ``lr``, ``head_lr`` (default: ``lr`` when ``lr`` is given, else the
        module's), ``loss`` (a :class:`~fl_sd.losses.LossConfig` or a :class:`~fl_sd.losses.MultiHeadLoss`; default:
        the module's) -- apply to this call only: nothing is left set on the module. A fresh SGD optimizer is built
        (momentum buffers reset every update, as the reference; ``momentum`` overrides the module's here). ``hooks``
        (:class:`fl_sd.hooks.StepHooks`) add what an algorithm needs to each step (a proximal term, meta-steps, ...). The network's train/eval mode and
        ``requires_grad`` flags are restored afterwards and its gradients released. Metrics are accumulated on the
        device; the only host synchronisation is at the end.

        ``on_epoch_end(epoch)`` (requires ``steps_per_epoch``) is called after every ``steps_per_epoch`` steps with the
        1-based number of the epoch just finished -- e.g. to evaluate after each fine-tuning epoch without resetting
        the optimizer's momentum between epochs; it may switch the network to eval mode (train mode is restored
        before the next step). Only complete epochs are reported.

        ``autocast`` (e.g. ``torch.autocast("cuda", dtype=torch.bfloat16)``: mixed precision) wraps the forward pass
        and the loss of every step.

        Raises :class:`NonFiniteLossError` (a ``FloatingPointError``) naming the first step whose loss was NaN/Inf;
        the module's weights are then undefined (load a good state before reusing it).
        """
        if on_epoch_end is not None and (steps_per_epoch is None or steps_per_epoch < 1):
            raise ValueError(f"on_epoch_end needs steps_per_epoch >= 1, got {steps_per_epoch!r}")
        part, body_lr, head_lr, loss_fn = self.update_settings(train_part, lr, head_lr, loss)
        hooks = hooks or StepHooks()
        for key, given in (("state", state), ("body", body_state), ("head", head_state)):
            if given is not None:
                self.load_state(given, None if key == "state" else key)
        groups = self._param_groups(part, body_lr, head_lr)
        net = self.net
        momentum = self.momentum if momentum is None else float(momentum)
        optimizer = torch.optim.SGD(groups, lr=body_lr, momentum=momentum, weight_decay=self.weight_decay)
        device = next(net.parameters()).device
        was_training = net.training
        net.train()
        records: list[Tensor] = []
        processed = steps = 0
        try:
            self._freeze_except(part)
            with torch.enable_grad():
                for x, y in batches:
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    with autocast if autocast is not None else nullcontext():
                        out = net(x)
                        losses = loss_fn(out, y)
                    optimizer.zero_grad(set_to_none=True)
                    losses.total.backward()
                    if not hooks.before_step(steps, optimizer):
                        optimizer.step()
                    hooks.after_step(steps, optimizer)
                    if hooks.record(steps):
                        records.append(self.step_record(losses, out, y))
                        processed += y.shape[0]
                    steps += 1
                    if on_epoch_end is not None and steps % steps_per_epoch == 0:
                        on_epoch_end(steps // steps_per_epoch)
                        net.train()
        finally:
            optimizer.zero_grad(set_to_none=True)
            self._freeze_except(self.train_part)
            if not was_training:
                net.eval()
        if not records:
            raise ValueError("local_update got no batches")
        metrics = self.summarise_steps(records, processed)
        return ClientUpdate(
            body_state=self.get_state("body"),
            head_state=self.get_state("head") if return_head else None,
            num_samples=processed if num_samples is None else int(num_samples),
            num_steps=len(records),
            metrics=metrics,
        )

    def update_settings(self, train_part: str | None = None, lr: float | None = None, head_lr: float | None = None,
                        loss: LossConfig | MultiHeadLoss | None = None) -> tuple[str, float, float, MultiHeadLoss]:
        """(part, body lr, head lr, loss module) of one update given :meth:`local_update`'s arguments: the module's
        settings where an argument is None; ``head_lr`` follows ``lr`` when only ``lr`` is given."""
        part = self.train_part if train_part is None else train_part
        if part not in TRAIN_PARTS:
            raise ValueError(f"train_part must be one of {TRAIN_PARTS}, got {part!r}")
        body_lr = self.lr if lr is None else float(lr)
        if head_lr is None:
            head_lr = body_lr if lr is not None else self.effective_head_lr
        loss_fn = self.loss_fn if loss is None else loss if isinstance(loss, MultiHeadLoss) else MultiHeadLoss(loss)
        return part, body_lr, float(head_lr), loss_fn

    def _param_groups(self, part: str, lr: float, head_lr: float) -> list[dict]:
        """SGD groups of what ``part`` trains: ``body`` at ``lr``, ``head`` at ``head_lr``, each with its ``names``."""
        if part not in TRAIN_PARTS:
            raise ValueError(f"train_part must be one of {TRAIN_PARTS}, got {part!r}")
        if lr < 0 or head_lr < 0:
            raise ValueError(f"learning rates must be >= 0, got lr={lr}, head_lr={head_lr}")
        groups = []
        for name, group_lr in (("body", lr), ("head", head_lr)):
            if part in (name, "full"):
                named = self.net.named_part_parameters(name)
                if named:
                    groups.append({"params": [p for _, p in named], "names": [n for n, _ in named], "lr": group_lr,
                                   "name": name})
        return groups

    def _freeze_except(self, part: str) -> None:
        train_body, train_head = part in ("body", "full"), part in ("head", "full")
        for p in self.net.body_parameters():
            p.requires_grad_(train_body)
        for p in self.net.head_parameters():
            p.requires_grad_(train_head)

    @torch.no_grad()
    def _loss_temp_values(self, losses: LossOutput, out: MultiHeadOutput) -> Tensor:
        """One device vector: the 5 loss parts, then the mean temperature of each auxiliary head (``value_names``)."""
        pieces = [torch.stack([v.detach().float() for v in losses])]
        if out.temperature:
            pieces.append(torch.stack([t.detach() for t in out.temperature]).float().mean(dim=1))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    @torch.no_grad()
    def step_record(self, losses: LossOutput, out: MultiHeadOutput, y: Tensor) -> Tensor:
        """One step's metrics as one device vector: the loss parts and mean temperatures (``value_names``), then the
        number of correct predictions of each head (``head_names``). :meth:`summarise_steps` turns a list of them into
        an update's metrics (also used by the batched engine, ``lightning_modules.batched``)."""
        logits = torch.stack([out.final.detach(), *(a.detach() for a in out.aux)])  # (heads, B, K)
        correct = (logits.argmax(dim=2) == y).sum(dim=1).float()
        return torch.cat([self._loss_temp_values(losses, out), correct])

    def summarise_steps(self, records: list[Tensor] | Tensor, processed: int) -> dict[str, float]:
        """Mean over steps of the :meth:`step_record` values and each head's accuracy over ``processed`` samples;
        raises :class:`NonFiniteLossError` for the first step whose loss was NaN/Inf."""
        table = (records if isinstance(records, Tensor) else torch.stack(records)).cpu().double()  # (steps, values); the one device -> host transfer
        total_loss = table[:, 0]
        bad = ~torch.isfinite(total_loss)
        sums = table.sum(dim=0).tolist()
        steps = len(records)
        if bad.any():
            first = int(bad.nonzero()[0, 0])
            raise NonFiniteLossError(first + 1, steps, float(total_loss[first]))
        metrics = {name: sums[i] / steps for i, name in enumerate(self.value_names)}
        offset = len(self.value_names)
        for j, head in enumerate(self.head_names):
            metrics[f"acc_{head}"] = sums[offset + j] / processed
        return metrics
