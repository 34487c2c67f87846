"""The service core: consumers, partitions, offsets, the engine and its deliveries.

Everything that runs inside ``dispatcher run`` between Kafka and an HTTP attempt:
reading the stages, deciding what each message fans out to, tracking what is
unfinished, and committing only what is done.
"""
