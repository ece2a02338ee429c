"""Old import paths of 0.1, kept for one release so RQ jobs enqueued before an upgrade still run."""
