"""DataModules and built-in tasks."""

from lightning_rl.data.arithmetic import ArithmeticDataModule, arithmetic_splits
from lightning_rl.data.io import read_rows
from lightning_rl.data.preferences import InvalidPreferenceError, PreferenceDataModule
from lightning_rl.data.prompts import PromptDataModule
from lightning_rl.data.rows import collate_rows

__all__ = [
    "ArithmeticDataModule",
    "InvalidPreferenceError",
    "PreferenceDataModule",
    "PromptDataModule",
    "arithmetic_splits",
    "collate_rows",
    "read_rows",
]
