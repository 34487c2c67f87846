"""The private broker keeps its records across a stop and a start on the same ports."""

from __future__ import annotations

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.brokers import PrivateBroker
from tests.support import Namespace


def test_private_broker_survives_a_restart(private_broker: PrivateBroker) -> None:
    ns = Namespace(kafka_bootstrap_servers=private_broker.bootstrap)
    assert ns.bootstrap == private_broker.bootstrap
    ns.publish(b'{"kept": true}', key=b"k")

    private_broker.stop()
    assert not private_broker.running()
    admin = AdminClient({"bootstrap.servers": private_broker.bootstrap})
    try:
        admin.list_topics(timeout=2)
        raise AssertionError("a stopped broker answered")
    except KafkaException:
        pass

    private_broker.start()
    consumer = Consumer(
        {
            "bootstrap.servers": private_broker.bootstrap,
            "group.id": "check",
            "enable.auto.commit": False,
        }
    )
    try:
        topic = ns.settings.input_topic
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        total = sum(
            high - low
            for low, high in (
                consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in parts
            )
        )
        assert total == 1
    finally:
        consumer.close()
