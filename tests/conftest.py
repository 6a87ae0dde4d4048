import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def broker():
    """A real Kafka-compatible broker (Tansu) on a free loopback port, for the whole session."""
    from streamgmm.dev.embedded import EmbeddedBroker

    instance = EmbeddedBroker().start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def topic(request):
    """A topic name unique to the test (the broker is shared)."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")
    return f"t-{name}"[:200]
