"""emofuse: multimodal emotion recognition (video, audio, text, speaker metadata) composed from plugins."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("emofuse")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def load(checkpoint, **kwargs):
    """A checkpoint ready to predict: ``emofuse.load("runs/x/model.safetensors").predict(["clip.wav"])``."""
    from emofuse.core.apps.predict import load as load_predictor

    return load_predictor(checkpoint, **kwargs)
