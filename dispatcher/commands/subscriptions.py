"""The command line's access to subscriptions: reads, and changes through the one writer.

A change takes the writer role for that one change: ``init_transactions`` with the
writer's fixed ``transactional.id`` fences whoever held it (the API's writer takes
it back for its next change, after reading to the end), the configuration is read
to its end, the change is decided by :mod:`dispatcher.manage` against that state,
and committed as one transaction. So the command line and the API cannot lose each
other's updates, and they accept and refuse the same things.
"""

from __future__ import annotations

from collections.abc import Callable

from dispatcher import manage
from dispatcher.catalog import load_catalog
from dispatcher.config_state import ConfigView
from dispatcher.config_writer import ConfigWriter
from dispatcher.core.table import SubscriptionTable
from dispatcher.errors import KafkaSetupError, Refusal, SubscriptionError
from dispatcher.kafka import Outgoing, check_topic, make_producer, produce_confirmed
from dispatcher.manage import Change, Outcome, new_webhook_id
from dispatcher.models import Subscription
from dispatcher.settings import Settings

__all__ = ["Change", "Outcome", "new_webhook_id"]

#: How long a seeding write may take to be acknowledged before it fails.
WRITE_TIMEOUT_S = 30.0


def load_table(settings: Settings) -> SubscriptionTable:
    table = SubscriptionTable(settings)
    table.load_once()
    return table


def get(settings: Settings, webhook_id: str) -> Subscription:
    table = load_table(settings)
    sub = table.get(webhook_id)
    if sub is None:
        raise SubscriptionError(_missing(table.ignored.get(webhook_id), webhook_id))
    return sub


def _missing(why: str | None, webhook_id: str) -> str:
    if why is None:
        return f"no subscription with webhook id {webhook_id!r}"
    return (
        f"no usable subscription with webhook id {webhook_id!r}: its record is ignored ({why}); "
        "`subscriptions delete` removes it"
    )


def list_all(settings: Settings, organization_id: str | None = None) -> list[Subscription]:
    table = load_table(settings)
    subs = table.for_organization(organization_id) if organization_id else table.all()
    return sorted(subs, key=lambda s: (s.organization_id, s.created_at, s.webhook_id))


def known_events(settings: Settings) -> list[str]:
    return [e.name for e in load_catalog(settings)]


def apply(settings: Settings, decide: Callable[[ConfigView], Outcome]) -> Outcome:
    """Take the writer role, read to the end, decide against that state, commit."""
    view = ConfigView(settings)
    view.start()
    writer = ConfigWriter(settings, view)
    try:
        outcome, _ = writer.apply(lambda: _records(decide(view)))
        return outcome
    finally:
        writer.close()
        view.stop()


def _records(outcome: Outcome) -> tuple[list[Outgoing], Outcome]:
    return outcome.records, outcome


def put(
    settings: Settings,
    webhook_id: str | None,
    *,
    organization_id: str | None,
    url: str | None,
    events: list[str] | None,
    plan: str | None,
    secret: str | None,
    no_secret: bool,
    enabled: bool | None,
    description: str | None,
    rate_limit_per_s: float | manage.Unchanged | None = manage.KEEP,
) -> Outcome:
    """Create a subscription, or change only the given fields of an existing one."""
    catalog = known_events(settings)

    def decide(view: ConfigView) -> Outcome:
        existing = view.subscription(webhook_id) if webhook_id else None
        change = manage.build(
            settings,
            existing=existing,
            webhook_id=webhook_id or new_webhook_id(),
            organization_id=organization_id,
            url=url,
            events=events,
            plan=plan,
            secret=secret,
            no_secret=no_secret,
            enabled=enabled,
            description=description,
            rate_limit_per_s=rate_limit_per_s,
            known_events=catalog,
        )
        return manage.of_change(settings, change)

    return apply(settings, decide)


def set_enabled(settings: Settings, webhook_id: str, on: bool) -> Outcome:
    return apply(
        settings,
        lambda view: manage.enable(settings, _known(view, webhook_id), None, webhook_id, on),
    )


def rotate(settings: Settings, webhook_id: str, secret: str | None) -> Outcome:
    return apply(
        settings,
        lambda view: manage.rotate_secret(
            settings, _known(view, webhook_id), None, webhook_id, secret
        ),
    )


def delete(settings: Settings, webhook_id: str) -> str:
    """Delete a subscription, or a record the dispatcher ignores (a tombstone either way).

    A record that does not validate is never loaded, so it cannot be fetched;
    deleting it is still how it leaves the compacted topic.
    """

    def decide(view: ConfigView) -> Outcome:
        if view.subscription(webhook_id) is None and webhook_id in view.ignored:
            return Outcome([manage.tombstone(settings, webhook_id)])
        return manage.delete(settings, _known(view, webhook_id), None, webhook_id)

    apply(settings, decide)
    return webhook_id


def _known(view: ConfigView, webhook_id: str) -> ConfigView:
    """The view, once ``webhook_id`` is known to be in it (the command line's message)."""
    if view.subscription(webhook_id) is None:
        raise Refusal(_missing(view.ignored.get(webhook_id), webhook_id), "not-found")
    return view


def write(settings: Settings, webhook_id: str, sub: Subscription | None) -> None:
    """Write a whole record, bypassing the writer and its rules: for seeding test and
    benchmark topics only, never while a writer is changing the same webhooks.

    Raises :class:`KafkaSetupError` unless the broker confirmed the record.
    """
    topic = settings.subscriptions_topic
    producer = make_producer(settings)
    # Checked first: librdkafka would otherwise wait 30 s for a missing topic to appear.
    check_topic(producer, settings, topic, WRITE_TIMEOUT_S / 3)
    record = Outgoing(topic, None if sub is None else sub.to_json(), webhook_id.encode())
    errors = produce_confirmed(producer, [record], WRITE_TIMEOUT_S, "subscription")
    if errors:
        raise KafkaSetupError(f"subscription {webhook_id} was not written to {topic}: {errors[0]}")
