"""In-memory stand-ins shared by the daemon-logic tests (no broker)."""

from streamgmm.service.kafka import Deliveries


class FakeMessage:
    """The methods of a confluent_kafka Message that as_batch and the daemon call."""

    def __init__(self, topic, partition, offset, value, timestamp_ms=1_000):
        self._t, self._p, self._o, self._v = topic, partition, offset, value
        self._ts = timestamp_ms

    def topic(self):
        return self._t

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def value(self):
        return self._v

    def key(self):
        return None

    def headers(self):
        return None

    def timestamp(self):
        return (1, self._ts)


class FakeSink:
    """KafkaSink's methods: records kept in ``sent``, delivery reports set by the test."""

    def __init__(self):
        self.sent, self.deliveries, self.purged = [], Deliveries(), 0

    def send(self, record):
        self.sent.append(record)

    def serve(self):
        pass

    def flush(self, timeout, give_up=None):
        return 0

    def take(self):
        taken, self.deliveries = self.deliveries, Deliveries()
        return taken

    def discard_pending(self):
        self.purged += 1

    def close(self, timeout=10.0):
        pass
