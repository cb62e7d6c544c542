"""VLAPolicy: GR00T N1's dual-system policy as a LightningModule that composes injected components.

System 2 (``backbone``) turns the frame-t views and the instruction into vision-language tokens; System 1
(``action_head``, flow matching or the regression baseline) turns the tokens, the state and the embodiment into an
action chunk. Both arrive as constructor arguments (factories from YAML, built in ``configure_model`` so that a large
VLM is not built before the Trainer and its strategy exist), so a recipe swaps either by ``class_path``.

Training rows. Each sample whose source trains on real actions gives one row for its own embodiment.
``pseudo_labelers`` (latent actions, inverse dynamics, ...; see ``components/pseudo_labels.py``) add further rows,
each a target for its own embodiment slot of the action head, for the samples whose source declares that kind in
its ``targets``; so actionless video trains the head without this module knowing how the labels are made. A
labeler that trains itself (a co-trained latent-action model) returns its own loss as ``aux_loss``.

Deployment inference (observation in, action chunk in robot units out) is ``vla_zoo.policy.Policy``'s; this module
trains and keeps the data contract (``data_spec``) in its checkpoints for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable

from torch import nn

from components.distributed import zero_loss
from components.embodiment import grow_embodiment_slots
from components.pseudo_labels import PseudoTargets
from datamodules import schema
from datamodules.spec import DataSpec
from lit_modules.checkpoint import DATA_SPEC_KEY, read_checkpoint
from lit_modules.distributed import require_find_unused_parameters
from lit_modules.optimization import LRSchedule, configure_optimizers, paper_adamw



def _build(part: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    return part if isinstance(part, nn.Module) else part()


def shuffled_vl_loss(head: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, state: torch.Tensor | None,
                     actions: torch.Tensor, action_mask: torch.Tensor, embodiment_id: torch.Tensor) -> torch.Tensor:
    """The head's loss when every row gets the vision-language tokens of the next row in the batch (another scene
    and instruction). Minus the loss on the true tokens with the same noise and flow times, it says how much the
    policy relies on what it sees and is told (logged as ``val/vl_gain``; near 0: it acts on state alone).

    Runs inside ``fork_rng``, so the random state is restored on exit: a ``head.loss`` call made right after
    draws the same noise and flow times."""
    devices = [tokens.device] if tokens.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        return head.loss(tokens.roll(1, 0), mask.roll(1, 0), state, actions, action_mask, embodiment_id)["loss"]


@dataclass(frozen=True)
class InitFrom:
    """A checkpoint whose ``parts`` (each must match it exactly) start a run: YAML ``init_from: {path: CKPT, parts:
    [backbone]}`` puts a new action head on a pretrained backbone; a plain ``init_from: CKPT`` restores both."""

    path: str
    parts: Sequence[str] = ("backbone", "action_head")


@dataclass(frozen=True)
class PolicyInput:
    """What the policy takes from a batch's images: the frame ``images[:, frame_index]`` (0 = the anchor step t),
    passed through ``augmentation`` in training steps only (e.g. ``components.augmentation.RandomShift``; validation
    and inference see the images as they are)."""

    frame_index: int = 0
    augmentation: nn.Module | None = None


def _as(cls: type, value: Any) -> Any:
    """``value`` as ``cls`` where it is the plain dict a checkpoint's hyper-parameters keep (or a path for
    ``InitFrom``)."""
    if isinstance(value, Mapping):
        return cls(**value)
    return cls(value) if cls is InitFrom and isinstance(value, (str, os.PathLike)) else value


class VLAPolicy(LightningModule):
    def __init__(
        self,
        backbone: Callable[[], nn.Module],
        action_head: Callable[[], nn.Module],
        pseudo_labelers: Sequence[nn.Module] = (),
        optimizer: OptimizerCallable = paper_adamw,
        lr_schedule: LRSchedule = LRSchedule(),
        observation: PolicyInput = PolicyInput(),
        init_from: str | InitFrom | None = None,
        privileged_head: nn.Module | None = None,
    ) -> None:
        """
        Args:
            backbone: System 2 factory (or module): ``(images [B,V,3,h,w] uint8, instructions) -> (tokens, mask)``.
            action_head: System 1 factory (or module) with ``loss(...)`` and ``sample(...)``; how it attends to the
                VL tokens (``use_vl_mask``) and whether it is compiled (``compile_backend``) are its own arguments.
            pseudo_labelers: modules producing extra targets for actionless data (see module docstring).
            optimizer: optimiser factory; default AdamW(1e-4, betas 0.95/0.999, wd 1e-5) as in the paper.
            lr_schedule: warm-up and decay (``LRSchedule``; paper: 5% warm-up, then cosine).
            observation: which frame of the batch's images the policy sees and how training augments it
                (``PolicyInput``).
            init_from: a checkpoint whose weights start this run (post-training from a pretrained model), as a path
                (backbone and action head) or ``InitFrom(path, parts)``. Unlike ``--ckpt_path`` it restores neither
                optimiser nor step: a new run starts from those weights.
            privileged_head: an auxiliary readout of the batch's ``privileged`` state (simulator-only object and
                goal positions) from the VL tokens (``components.privileged_head.PrivilegedStateHead``), trained
                with its ``loss_weight`` beside the action loss. Its gradient reaches the backbone; inference never
                uses it. Logged as ``{train,val}/privileged_loss``.
        """
        super().__init__()
        lr_schedule, observation = _as(LRSchedule, lr_schedule), _as(PolicyInput, observation)
        init_from = _as(InitFrom, init_from) if init_from else None
        # From YAML, LightningCLI stores the parsed config of every injected component, so the checkpoint
        # rebuilds them alone. Module objects passed from Python are not pickled into the hyper-parameters; pass
        # them again to load_from_checkpoint.
        live = [name for name, value in (("backbone", backbone), ("action_head", action_head),
                                         ("pseudo_labelers", pseudo_labelers), ("optimizer", optimizer),
                                         ("observation", observation.augmentation),
                                         ("privileged_head", privileged_head))
                if isinstance(value, nn.Module) or (name == "pseudo_labelers" and len(value))
                or (name == "optimizer" and not isinstance(value, type))]
        self.save_hyperparameters(ignore=live)
        for name in ("lr_schedule", "observation", "init_from"):  # plain data in checkpoints (weights_only loads)
            if is_dataclass(self.hparams.get(name)):
                self.hparams[name] = asdict(self.hparams[name])
        # LightningCLI replaces hparams with the parsed config: keep the callables themselves, outside nn.Module's
        # registry (a module passed directly would otherwise be registered twice and saved under two names).
        for name, value in (("_backbone_factory", backbone), ("_head_factory", action_head),
                            ("_optimizer_factory", optimizer)):
            object.__setattr__(self, name, value)
        # Modules given directly (Python use) are kept; factories (YAML) are built in configure_model.
        self.backbone = backbone if isinstance(backbone, nn.Module) else None
        self.action_head = action_head if isinstance(action_head, nn.Module) else None
        self.pseudo_labelers = nn.ModuleList(pseudo_labelers)
        self.lr_schedule, self.frame_index, self.init_from = lr_schedule, observation.frame_index, init_from
        self.image_augmentation = observation.augmentation
        self.privileged_head = privileged_head
        self.data_spec: DataSpec | None = None  # normalisers + embodiment map, set from the datamodule

    # ------------------------------------------------------------------ construction
    def configure_model(self) -> None:
        if self.backbone is None:
            self.backbone = _build(self._backbone_factory)
        if self.action_head is None:
            self.action_head = _build(self._head_factory)
        head_dim = getattr(self.action_head, "cross_attention_dim", None)
        vl_dim = getattr(self.backbone, "out_dim", None)
        if head_dim is not None and vl_dim is not None and head_dim != vl_dim:
            raise ValueError(
                f"backbone.out_dim ({vl_dim}) != action_head.cross_attention_dim ({head_dim}): set the backbone's "
                f"`project_to` and the head's `cross_attention_dim` to the same width in the recipe"
            )

    def _load_initial_weights(self, init_from: str | InitFrom) -> None:
        init_from = _as(InitFrom, init_from)
        path = os.fspath(init_from.path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"model.init_args.init_from: checkpoint {path!r} not found (run the pretraining recipe first, or "
                "point init_from at an existing .ckpt)"
            )
        parts = tuple(f"{p}." for p in init_from.parts)
        state = read_checkpoint(path)["state_dict"]
        state = {k: v for k, v in state.items() if k.startswith(parts)}
        grow_embodiment_slots(self, state)
        missing, unexpected = self.load_state_dict(state, strict=False)
        # Parts not restored (a new head, a pseudo-labeler) start fresh; restored parts must match exactly, or
        # the user is post-training a different architecture by mistake.
        core = [k for k in missing + unexpected if k.startswith(parts)]
        if core or not state:
            raise ValueError(f"init_from {path!r}: {list(init_from.parts)} do not match the checkpoint "
                             f"(first mismatches: {core[:5]}); use the same sizes as the pretraining recipe")
        self._initialised = True

    def setup(self, stage: str) -> None:
        self.configure_model()
        # Only a Trainer run starts from init_from; load_from_checkpoint (deployment) never calls setup, so a
        # post-trained checkpoint does not need the pretraining checkpoint to exist on the robot's machine.
        if stage == "fit" and self.init_from is not None and not getattr(self, "_initialised", False):
            self._load_initial_weights(self.init_from)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        spec = getattr(datamodule, "data_spec", None)
        if callable(spec):
            spec = spec()
            self.data_spec = DataSpec.from_dict(spec) if isinstance(spec, dict) else spec
            self._check_label_slots()

    def on_fit_start(self) -> None:
        require_find_unused_parameters(
            self.trainer, "VLAPolicy",
            "each embodiment slot has its own parameters, and slots absent from a rank's batch get no gradient",
        )

    def _check_label_slots(self) -> None:
        """A pseudo-label kind needs its own action-head slot: sharing a real embodiment's would mix the targets."""
        real = self.data_spec.real_slots()
        for labeler in self.pseudo_labelers:
            slot = getattr(labeler, "embodiment_id", None)
            if slot in real:
                raise ValueError(f"pseudo-labeler {labeler.kind!r} uses embodiment slot {slot}, the slot of the real "
                                 f"embodiment {real[slot]!r}; give the labeler's `embodiment_id` a slot of its own "
                                 "(below the action head's `num_embodiments`)")

    # ------------------------------------------------------------------ training
    def _vl_tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch[schema.IMAGES][:, self.frame_index]  # [B, V, 3, h, w]
        if self.training and self.image_augmentation is not None:
            images = self.image_augmentation(images)
        return self.backbone(images, list(batch[schema.INSTRUCTION]))

    def _source_declares(self, batch: dict, kind: str) -> torch.Tensor:
        """[B] bool: the sample's source lists ``kind`` among its targets (``SourceConfig.targets``)."""
        per_source = self.data_spec.source_targets if self.data_spec is not None else None
        if per_source is None:  # a datamodule without declarations: real actions wherever they exist
            return batch[schema.HAS_ACTION].clone() if kind == "action" else torch.ones_like(batch[schema.HAS_ACTION])
        table = torch.tensor([kind in t for t in per_source], device=batch[schema.SOURCE_ID].device)
        return table[batch[schema.SOURCE_ID]]

    def _training_rows(self, batch: dict) -> list[PseudoTargets]:
        rows = []
        real = (batch[schema.HAS_ACTION] & self._source_declares(batch, "action")).nonzero(as_tuple=True)[0]
        if real.numel():
            rows.append(PseudoTargets(
                index=real,
                actions=batch[schema.ACTIONS][real],
                action_mask=batch[schema.ACTION_MASK][real],
                embodiment_id=batch[schema.EMBODIMENT_ID][real],
                state=batch[schema.STATE][real],
                name="real",
            ))
        for labeler in self.pseudo_labelers:
            extra = labeler.targets(batch, self._source_declares(batch, labeler.kind))
            if extra is not None:
                rows.append(extra)
        return rows

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        tokens, mask = self._vl_tokens(batch)  # [B, S, D], [B, S]
        rows = self._training_rows(batch)
        batch_size = tokens.shape[0]
        aux = [r.aux_loss for r in rows if r.aux_loss is not None]
        privileged = self._privileged_loss(tokens, mask, batch, stage)
        if privileged is not None:
            aux.append(self.privileged_head.loss_weight * privileged)
        for r in rows:
            if r.aux_loss is not None:
                self.log(f"{stage}/aux_loss_{r.name}", r.aux_loss.detach(), batch_size=batch_size)
        rows = [r for r in rows if r.index.numel()]
        if not rows:
            # Nothing to predict in this batch; keep every parameter in the graph so DDP does not hang.
            loss = zero_loss(tokens) + sum(aux, torch.zeros((), device=tokens.device))
            self.log(f"{stage}/loss", loss, batch_size=batch_size)
            return loss
        index = torch.cat([r.index for r in rows])
        targets = (
            tokens[index], mask[index],
            torch.cat([r.state if r.state is not None else torch.zeros_like(batch[schema.STATE][r.index]) for r in rows]),
            torch.cat([r.actions for r in rows]),
            torch.cat([r.action_mask for r in rows]),
            torch.cat([r.embodiment_id for r in rows]),
        )
        shuffled = None
        if stage == "val" and index.numel() > 1:
            shuffled = shuffled_vl_loss(self.action_head, *targets)  # restores the random state: same noise below
        out = self.action_head.loss(*targets)
        loss = out["loss"]
        self.log(f"{stage}/action_loss", loss, batch_size=batch_size, prog_bar=stage == "train")
        if shuffled is not None:
            self.log("val/vl_gain", shuffled - loss, batch_size=batch_size)
        for a in aux:
            loss = loss + a
        self.log(f"{stage}/loss", loss, batch_size=batch_size, prog_bar=True)
        self._log_breakdown(stage, out["per_sample"].detach(), rows, batch, index, embodiment_id=targets[-1])
        return loss

    def _privileged_loss(self, tokens: torch.Tensor, mask: torch.Tensor, batch: dict, stage: str) -> torch.Tensor | None:
        if self.privileged_head is None:
            return None
        if schema.PRIVILEGED not in batch:
            raise ValueError("model.init_args.privileged_head is set but the batches carry no privileged state: train "
                             "on sources written with it (e.g. MetaWorldDemos(privileged=true)), or remove the head")
        loss = self.privileged_head.loss(tokens, mask, batch[schema.PRIVILEGED], batch[schema.PRIVILEGED_MASK])
        self.log(f"{stage}/privileged_loss", loss.detach(), batch_size=tokens.shape[0])
        return loss

    def _log_breakdown(self, stage: str, per_sample: torch.Tensor, rows, batch: dict, index: torch.Tensor,
                       embodiment_id: torch.Tensor) -> None:
        """Per target kind and per data source loss, so a mixture's tiers can be watched separately."""
        start = 0
        for r in rows:
            n = r.index.numel()
            self.log(f"{stage}/loss_{r.name}", per_sample[start:start + n].mean(), batch_size=n)
            start += n
        spec = self.data_spec
        source_names = spec.sources if spec is not None else []
        slot_names = {e.id: name for name, e in spec.embodiments.items()} if spec is not None else {}
        for key, ids, names in (
            ("source", batch[schema.SOURCE_ID][index], dict(enumerate(source_names))),
            ("embodiment", embodiment_id, slot_names),
        ):
            for i in ids.unique().tolist():
                sel = ids == i
                self.log(f"{stage}/loss_{key}/{names.get(i, i)}", per_sample[sel].mean(), batch_size=int(sel.sum()))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        schedule = self.lr_schedule
        return configure_optimizers(self, self._optimizer_factory, schedule.kind, schedule.warmup_ratio)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.data_spec is not None:
            checkpoint[DATA_SPEC_KEY] = self.data_spec.to_dict()  # plain data: loads with weights_only

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        spec = checkpoint.get(DATA_SPEC_KEY)
        self.data_spec = DataSpec.from_dict(spec) if spec is not None else None
        if self.privileged_head is None:  # a training-only readout: inference can load without it
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("privileged_head.")]:
                del state[key]
        if not len(self.pseudo_labelers):
            # Labelers only make training targets and are not rebuilt from the hyper-parameters (a frozen one would
            # need its own checkpoint on the deployment machine): a model loaded for inference drops their weights.
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("pseudo_labelers.")]:
                del state[key]
