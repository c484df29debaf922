"""Flower tests start real processes (SuperLink, SuperNodes, Ray). Without flwr they skip
with the reason, or fail when IOTCOMPRESS_REQUIRE_FLOWER=1 (CI sets it)."""

import os

import pytest

from harness import flower_available


# Module scope: autouse fixtures come first in their scope, so this runs before the modules'
# fixtures that start the processes.
@pytest.fixture(scope="module", autouse=True)
def _need_flower(request):
    if request.node.get_closest_marker("flower") is None:
        return  # the proxy's own tests need no Flower
    reason = flower_available()
    if reason is not None:
        if os.environ.get("IOTCOMPRESS_REQUIRE_FLOWER") == "1":
            pytest.fail(f"IOTCOMPRESS_REQUIRE_FLOWER=1 but {reason}")
        pytest.skip(reason)
