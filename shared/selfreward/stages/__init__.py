"""The loop's stages: one module per stage, each with its `STAGE` record (selfreward.stages.stage).

`selfreward.stages.plan` orders them (set-up: prepare, sft, publish; iteration t >= 1:
prompts, candidates, judgments, pairs, train, publish, evaluate) and says what is left to run
(`pending`); the drivers (selfreward.drivers) run what is pending with `stage.run_stage`.
"""
