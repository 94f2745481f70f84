"""Data plumbing: decoding, preprocessing, splits, normalisation and the feature cache."""
