"""HTTP out: the egress guard and client, one signed attempt, and the signatures.

Nothing here knows about Kafka; the engine, ``send-test`` and the API call in.
"""
