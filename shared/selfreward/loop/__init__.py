"""The online feedback loop: stages shared by the embedded runner and the coordinator."""
