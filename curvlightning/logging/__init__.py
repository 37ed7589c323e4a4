"""Logging for curvature estimates: wandb media, offline run files and the report.

The submodules import wandb and matplotlib only when a function needs them:

- :mod:`curvlightning.logging.wandb_media`: histograms, line plots and images for the
  ``WandbLogger`` of a Lightning ``Trainer``;
- :mod:`curvlightning.logging.wandb_offline`: a reader for the run file wandb writes
  in offline mode;
- :mod:`curvlightning.logging.report`: a Markdown report with figures in the run
  folder.
"""
