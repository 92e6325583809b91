"""MoLE-Flow continual anomaly detection: frozen normalizing-flow base + per-task adapters.

Modules: ``model`` (MoLEFlow, MoLEFlowConfig), ``train`` (train_task, TrainConfig), ``store``
(save_model / load_model: base + per-task safetensors adapters with sha256), ``evaluate``
(per-task metrics, accuracy matrix, forgetting/BWT, routing), ``export`` / ``serving`` (Triton),
``cli`` (``linewatch-models moleflow {train-task,evaluate,export}``).
"""
