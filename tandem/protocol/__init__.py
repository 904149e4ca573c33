"""Wire formats and subject names: the only place tandem defines them."""

from tandem.protocol import messages as _messages
from tandem.protocol.messages import *  # noqa: F403
from tandem.protocol.subjects import DEFAULT_NAMESPACE, Subjects

__all__ = [*_messages.__all__, "DEFAULT_NAMESPACE", "Subjects"]
