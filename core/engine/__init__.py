"""The engine: the trainer and its stages, model assembly, checkpoint I/O of whole models, metrics."""
