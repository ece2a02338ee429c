"""The web dashboard: runs, iterations with live stage progress, metrics and training curves, a
data browser, served at /ui by the coordinator and by `selfreward ui` over an artifact folder."""
