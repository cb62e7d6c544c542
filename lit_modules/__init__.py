"""LightningModules that compose components received as constructor arguments."""
