import os
import re
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
    name = re.sub(r"[^A-Za-z0-9.-]", "-", request.node.name.replace("]", ""))  # Kafka's legal topic names
    return f"t-{name}"[:200]
