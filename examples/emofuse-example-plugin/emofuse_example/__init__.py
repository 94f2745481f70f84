"""An example third-party emofuse plugin."""
