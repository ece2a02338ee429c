"""The trainer service: SFT and DPO with TRL + PEFT LoRA, as RQ jobs or in-process.

Entry points: `jobs.sft_job` / `jobs.dpo_job` (RQ, queue `train`), `runner.run` (in-process; the
CLI `selfreward train sft|dpo` and the embedded loop), `worker` (the RQ worker), `train_entry`
(each process of `accelerate launch`). docs/training.md describes the jobs, the LoRA lineage and
the reference model, resume, the accelerate configs and the bad-input rules.
"""
