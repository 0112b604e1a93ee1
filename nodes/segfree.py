"""Placeholder so the pack loads while the segmentation-free guidance nodes are written."""
NODES = []
