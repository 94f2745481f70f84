"""This plugin's components through emofuse's shipped conformance kit."""
from emofuse.core.testing import ConformanceSuite


class TestExampleComponents(ConformanceSuite):
    distribution = "emofuse-example-plugin"
