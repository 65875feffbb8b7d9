"""effopd inside other training loops: :mod:`effopd.integrations.trl` runs EffOPD as a callback of
any transformers ``Trainer`` (TRL's ``DistillationTrainer``, ``GKDTrainer``, ``GRPOTrainer``, ...)."""
