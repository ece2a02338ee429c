"""Old import path of the coordinator's stage jobs (0.1); see `jobs`."""
