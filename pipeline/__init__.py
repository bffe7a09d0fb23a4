"""featpipe: image folders and buckets → WebDataset shards → feature vectors."""

__version__ = "0.1.0"
