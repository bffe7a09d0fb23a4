"""Sub-commands that need torch: their modules are imported only when they run."""

from __future__ import annotations

import argparse


def add_extract_commands(sub: argparse._SubParsersAction) -> None:
    pass
