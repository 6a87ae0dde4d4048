"""The daemon: configuration, Kafka source and sink, checkpoints, metrics and health, the loop."""
