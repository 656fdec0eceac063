"""What every command and both trainers run on.

`cli` (the commands' flag convention and failure policy), `paths` (local paths, atomic writes),
`distributed` (multi-process start-up and the multi-host reduction), `sharding` (the device mesh from the
config and parameter shardings), `compute` (compute dtype, remat policies, the attention kernel, GPU XLA flags).
"""
