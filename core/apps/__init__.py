"""The applications built on the engine: evaluation, comparison, search, prediction, reports. They return data; the CLI prints."""
