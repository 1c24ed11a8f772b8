"""Training and evaluation of NAT/DiNAT: `natjax train`, `natjax eval` and the offline default.

Modules: config (TrainConfig + overrides), data (sources, deterministic loader), augment, mesh
(sharding rules), state (jitted steps), checkpoint (orbax), metrics (JSONL + tfevents), plot,
loop (train / evaluate), cli. Import the submodules directly; this package imports nothing heavy.
"""
