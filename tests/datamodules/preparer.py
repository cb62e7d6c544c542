"""A preparer for the tests: writes two small sources (annotations postponed, as in most project modules)."""

from __future__ import annotations

from tests.datamodules.synth import make_source


class WriteShards:
    def __init__(self, root: str) -> None:
        self.root = root

    def prepare(self) -> None:
        make_source(f"{self.root}/arm", "arm", 4, embodiment="arm")
        make_source(f"{self.root}/hand", "hand", 2, embodiment="hand", has_action=False)
