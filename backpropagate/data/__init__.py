"""Data sets: reading, format detection, validation, tokenization and packing.

The training engine calls :func:`prepare_datasets` and :func:`collate`; the CLI and the web
app call :func:`validate_dataset`. Nothing here imports torch at module level.
"""

from backpropagate.data.formats import FORMATS, Example
from backpropagate.data.loading import RowIssue, collect, load_examples
from backpropagate.data.packing import collate, pack
from backpropagate.data.prepare import DataStats, PreparedData, dataset_fingerprint, prepare_datasets
from backpropagate.data.tokenize import IGNORE, tokenize_example
from backpropagate.data.validate import ValidationReport, validate_dataset

__all__ = [
    "FORMATS",
    "IGNORE",
    "DataStats",
    "Example",
    "PreparedData",
    "RowIssue",
    "ValidationReport",
    "collate",
    "collect",
    "dataset_fingerprint",
    "load_examples",
    "pack",
    "prepare_datasets",
    "tokenize_example",
    "validate_dataset",
]
