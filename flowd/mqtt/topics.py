"""MQTT topic filter matching, as the broker does it (``+`` one level, ``#`` the rest)."""

from __future__ import annotations


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True when ``topic`` is matched by ``topic_filter``."""
    filter_parts = topic_filter.split("/")
    topic_parts = topic.split("/")
    if topic.startswith("$") and not topic_filter.startswith("$"):
        return False
    for index, part in enumerate(filter_parts):
        if part == "#":
            return index == len(filter_parts) - 1
        if index >= len(topic_parts):
            return False
        if part != "+" and part != topic_parts[index]:
            return False
    return len(filter_parts) == len(topic_parts)


def is_valid_publish_topic(topic: object) -> bool:
    """A topic one may publish to: non-empty UTF-8 text without wildcards or NUL."""
    if not isinstance(topic, str):
        return False
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return 0 < size <= 65535 and not any(c in topic for c in "+#\x00")


def is_valid_filter(topic_filter: object) -> bool:
    """A subscription filter: ``#`` only last, ``+`` only as a whole level."""
    if not isinstance(topic_filter, str) or not topic_filter or "\x00" in topic_filter:
        return False
    if not is_valid_publish_topic(topic_filter.replace("+", "x").replace("#", "x")):
        return False  # not UTF-8 (a lone surrogate) or too long
    parts = topic_filter.split("/")
    for index, part in enumerate(parts):
        if "#" in part and (part != "#" or index != len(parts) - 1):
            return False
        if "+" in part and part != "+":
            return False
    return True
