"""The message bus: patterns, delivery guarantees and security over pluggable backends."""
