from google.cloud import pubsub_v1

from tests.conftest import PROJECT


def test_emulator_publish_and_pull(pubsub_emulator):
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(PROJECT, "smoke")
    sub = subscriber.subscription_path(PROJECT, "smoke-sub")
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=sub, topic=topic)
    publisher.publish(topic, b"hello", job_id="x").result()
    resp = subscriber.pull(subscription=sub, max_messages=1, timeout=10)
    assert resp.received_messages[0].message.data == b"hello"
    assert resp.received_messages[0].message.attributes["job_id"] == "x"
