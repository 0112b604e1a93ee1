"""Shapes world: a seeded procedural image world (world.py), a classical detector for it
(detector.py) and the small demo models trained on it (models.py). Plain numpy/torch; the
ComfyUI node is nodes/shapes_world_loader.py and the training commands live in training/."""
