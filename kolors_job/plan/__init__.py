"""The memory plan: every stage's peak GPU memory, host RAM and disk on a card, predicted on the CPU (fake tensors),
and the settings that make a job fit (``train.memory: auto``). ``kolors-job plan`` prints it; the runner applies it.

``fake`` runs modules without memory, ``simulate`` is the job's device work as stages, ``table`` keeps their
results, ``cards`` lists the GPUs, ``planner`` judges and chooses, ``runtime`` plans the visible card, ``cli`` is
the command.
"""
