"""Reconnect policy of the Redis sources (plasma's semantics), as a pure state machine.

Each failed attempt counts one failure; a success resets the count. When the
count reaches ``max_retry`` the configured behaviour decides: ``die`` gives up
(the process exits non-zero so a supervisor restarts it), ``alive`` resets the
count and keeps retrying forever. ``max_retry`` 0 gives up (``die``) at the first
failure. The caller waits ``PLASMA_SUBSCRIBER_REDIS_RETRY_INTERVAL`` between
attempts; this module only decides.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

__all__ = ["Decision", "RetryState"]


class Decision(enum.Enum):
    RETRY = "retry"
    GIVE_UP = "give up"


@dataclass
class RetryState:
    max_retry: int
    behavior: Literal["die", "alive"] = "die"
    failures: int = 0

    def succeeded(self) -> None:
        self.failures = 0

    def failed(self) -> Decision:
        self.failures += 1
        if self.failures < self.max_retry:
            return Decision.RETRY
        if self.behavior == "alive":
            self.failures = 0
            return Decision.RETRY
        return Decision.GIVE_UP
