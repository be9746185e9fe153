"""Training: the loop shared by pretraining and fine-tuning, the batch plan, the optimizer's
parameter groups and schedule, the run's state, stop policy, recovery from non-finite steps, the
log and metrics, validation, and deterministic mode.
"""
