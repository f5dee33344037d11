"""The algorithms' implementations, one module each, over the update engine (:mod:`precise_rl.rl.update`).

The table that names them (knobs, accepted samplers, what a rollout keeps) is
:mod:`precise_rl.algorithm_table`; :mod:`.base` is the interface an implementation fills in.
"""
