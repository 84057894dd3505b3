"""The four segments of a triplet example: which prompt (short or long) followed by which
response (chosen or rejected).

The losses index their tables by :class:`Role`, and the data layer packs segments by it; it lives
here, importing nothing, so neither of those packages imports the other for it.
"""

from __future__ import annotations

import enum


class Role(enum.IntEnum):
    """A segment of an example: which prompt, followed by which response."""

    SHORT_CHOSEN = 0
    SHORT_REJECTED = 1
    LONG_CHOSEN = 2
    LONG_REJECTED = 3

    @property
    def prompt_sequence(self) -> int:
        """Index of this segment's prompt in an example's sequences
        (:data:`solopo_mcore.data.schema.SEQUENCES_PER_EXAMPLE`)."""
        return 0 if self in (Role.SHORT_CHOSEN, Role.SHORT_REJECTED) else 1

    @property
    def response_sequence(self) -> int:
        """Index of this segment's response in an example's sequences."""
        return 2 if self in (Role.SHORT_CHOSEN, Role.LONG_CHOSEN) else 3


ROLE_NAMES = tuple(role.name.lower() for role in Role)
"""``short_chosen, short_rejected, long_chosen, long_rejected``: the columns of a reference
sidecar's ``[N, 4]`` table, by Role."""
