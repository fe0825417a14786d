"""The HTTP API: an app factory and one router per concern."""
