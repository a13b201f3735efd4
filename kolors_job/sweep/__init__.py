"""Sweeps: many runs of one job with different settings, scored by the job's own gate.

kolors-job does not schedule trials: Katib (Kubernetes) and PAI AutoML (DLC) do. This package holds what
they need from us: the sweep file (:mod:`.spec`), ``run --set`` and the trial's metric lines
(:mod:`.overrides`, :mod:`.metrics`, :mod:`.trial`), and ``sweep report`` (:mod:`.report`), which ranks the
trials from their outputs alone and publishes the winner. The engines' renderers live in
``kolors_job.launch.katib`` and ``kolors_job.launch.pai_automl``.
"""
