"""Clients of the services and remote APIs (OpenAI-compatible, Gemini, judge, coordinator)."""
