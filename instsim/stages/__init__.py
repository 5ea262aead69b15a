"""The logic of the workflow's stages, one module per stage (or group of stages); the Snakemake scripts in
``workflow/scripts/`` are thin wrappers around these. The reusable library is the rest of :mod:`instsim`
(:mod:`instsim.nerf`, :mod:`instsim.detect`, :mod:`instsim.neuralsim`, :mod:`instsim.scene`, ...).

* :mod:`.config`: checks of the workflow config beyond its JSON schema; typed views of its sections.
* :mod:`.runner`: :func:`~.runner.run_stage`, how every script runs (logging, GPU claim, clean errors).
* :mod:`.dataset`: ``generate_dataset``; :mod:`.intrinsics`: ``extract_intrinsics``;
  :mod:`.target`: ``render_target``.
* :mod:`.strategies`: ``train_detector`` / ``evaluate`` (pose distribution per strategy, loading NeRFs
  and COCO sets).
* :mod:`.report`: ``summarize``; :mod:`.neuralsim_plots`: the ``optimize_distribution`` plots.
"""
