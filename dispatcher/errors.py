"""The dispatcher's exception tree.

    DispatcherError
    ├── ConfigError          a setting or command-line value is wrong (exit 2)
    ├── KafkaSetupError      topics missing or misconfigured, broker unreachable (exit 1)
    ├── EngineFailure        the dispatch pump or a polling thread died (exit 1)
    └── SubscriptionError    a subscription record or command input is invalid (exit 2)

Errors of dependencies (confluent-kafka, httpx, pydantic) are translated into these
at the boundary so the command line can print one clear line instead of a traceback.
"""


class DispatcherError(Exception):
    """Root of every error the dispatcher raises on purpose."""

    exit_code = 1


class ConfigError(DispatcherError):
    """A setting or command-line value is invalid."""

    exit_code = 2


class KafkaSetupError(DispatcherError):
    """The broker is unreachable or a topic is missing or wrongly configured."""


class EngineFailure(DispatcherError):
    """The engine cannot go on: its pump or a polling thread died; the process exits."""


class SubscriptionError(DispatcherError):
    """A subscription is invalid, unknown or not allowed."""

    exit_code = 2
