"""LightningDataModules, shard I/O and normalisation."""
