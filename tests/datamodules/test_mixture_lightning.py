"""The mixture inside a Lightning run: checkpoints carry its state, the monitor logs, YAML configures it."""

import warnings

import jsonargparse
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.mixture import MixtureDataModule, normalizers_from_state
from vla_zoo.callbacks import MixtureMonitor
from tests.datamodules.preparer import WriteShards


class ActionMean(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(4))
        self.seen_keys: set[str] = set()
        self.first_batch: list | None = None

    def training_step(self, batch, batch_idx):
        self.seen_keys |= set(batch)
        if self.first_batch is None:
            self.first_batch = batch_ids(batch)
        err = (batch["actions"] - self.bias) * batch["action_mask"]
        return err.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batch_ids(batch) -> list:
    return list(zip(*(batch[k].tolist() for k in ("source_id", "episode", "step"))))


def config(tmp_path) -> dict:
    return {
        "sources": [
            {"name": "arm", "shards": f"{tmp_path}/arm/shard-*.tar", "embodiment": "arm", "weight": 0.75},
            {"name": "hand", "shards": f"{tmp_path}/hand", "embodiment": "hand", "weight": 0.25, "has_action": False},
        ],
        "embodiments": {"arm": 0, "hand": 1}, "horizon": 4, "max_state_dim": 4, "max_action_dim": 4,
        "batch_size": 16, "batches_per_epoch": 3,
    }


def fit(tmp_path, dm, model, max_steps, ckpt_path=None) -> Trainer:
    trainer = Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[MixtureMonitor(log_every_n_steps=1), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_checkpoint_holds_mixture_state_and_resume_continues_the_epoch_counter(tmp_path):
    dm = MixtureDataModule(**config(tmp_path), prepare=WriteShards(str(tmp_path)))
    model = ActionMean()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(tmp_path, dm, model, max_steps=6)  # two epochs of 3 batches
    # Without val_sources there is no validation, and no warning about an empty validation loader.
    assert not [w for w in caught if "Total length" in str(w.message)], [str(w.message) for w in caught]
    assert not any(k.startswith("_") for k in model.seen_keys)  # error counts never reach the model
    assert trainer.callback_metrics["data/frac_arm"] > 0.5 and trainer.callback_metrics["data/frac_hand"] > 0.05
    # Counts as scalars too: at the last step (6 x 16 samples drawn) they sum to the samples drawn.
    counts = [float(trainer.callback_metrics[f"data/samples_{name}"]) for name in ("arm", "hand")]
    assert sum(counts) == 6 * 16 and counts[0] == dm.drawn_counts[0]
    assert sum(dm.drawn_counts.values()) == 6 * 16 and dm.epochs_started == 2

    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["MixtureDataModule"]["epochs_started"] == 2
    norms = normalizers_from_state(ckpt)  # a whole checkpoint un-normalises on its own
    assert norms["arm"].dim("actions") == 2 and norms["arm"].mode == "min_max"

    resumed, model = MixtureDataModule(**config(tmp_path)), ActionMean()
    fit(tmp_path, resumed, model, max_steps=9, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    # The resumed run reads the stream of epoch 2: fresh, not a replay of epoch 0, and reproducible.
    assert model.first_batch == batch_ids(next(iter(dm.make_dataset(rank=0, world_size=1, epoch=2))))
    assert model.first_batch != batch_ids(next(iter(dm.make_dataset(rank=0, world_size=1, epoch=0))))


def test_yaml_config_parses_sources_and_preparer(tmp_path):
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(MixtureDataModule, "data")
    yaml_text = f"""
data:
  embodiments: {{arm: 0, hand: 1}}
  horizon: 4
  sources:
    - {{name: arm, shards: {tmp_path}/arm, embodiment: arm, weight: 0.5, normalization: q01_q99}}
    - {{name: hand, shards: {tmp_path}/hand, embodiment: hand, weight: 0.5, has_action: false}}
  prepare:
    class_path: tests.datamodules.test_mixture_lightning.WriteShards
    init_args: {{root: {tmp_path}}}
"""
    cfg = parser.instantiate_classes(parser.parse_string(yaml_text))
    dm = cfg.data
    dm.prepare_data()
    dm.setup()
    assert [s.name for s in dm.sources] == ["arm", "hand"] and dm.normalizers["arm"].mode == "q01_q99"
