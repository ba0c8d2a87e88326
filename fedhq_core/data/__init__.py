"""Datasets and client partitioners."""
from .datasets import DataError, Dataset, Split, load_dataset
from .partition import partition, partition_dirichlet, partition_iid, partition_kclass

__all__ = ["DataError", "Dataset", "Split", "load_dataset", "partition", "partition_dirichlet",
           "partition_iid", "partition_kclass"]
