"""Services: policy, judge, trainer, coordinator (see docs/architecture.md)."""
