"""The judge service: FastAPI over selfreward.judging (app.create_app; settings from the environment)."""
