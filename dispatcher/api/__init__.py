"""The webhooks management API (``dispatcher api``): FastAPI over the Kafka topics."""
