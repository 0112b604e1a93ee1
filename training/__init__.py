"""Training commands for the shapes-world demo models (run from the pack root:
`python -m training.train_vae`, `training.train_clip`, `training.train_unet`)."""
