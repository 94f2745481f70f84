"""The conformance kit: the checks every emofuse component must pass, for built-ins and third-party
plugins alike (timm's ``tests/test_models.py`` style, shipped so an outside package can run it).

In a plugin's own tests::

    from emofuse.core.testing import ConformanceSuite

    class TestMyComponents(ConformanceSuite):
        distribution = "my-emofuse-plugin"   # check what this distribution registers

Each registered encoder, fusion, loss and dataset reader of that distribution becomes its own test:
built with its defaults (or `options`), run forward and backward, fed a batch with a modality
missing, its cached path checked against the direct one with the media stripped, saved and reloaded
through safetensors. `make_batch` gives shape-correct batches with every modality.
"""
from emofuse.core.testing.batches import make_batch
from emofuse.core.testing.checks import check_dataset, check_encoder, check_fusion, check_loss
from emofuse.core.testing.suite import ConformanceSuite

__all__ = ["ConformanceSuite", "make_batch", "check_encoder", "check_fusion", "check_loss", "check_dataset"]
