"""Offline preprocessing: mesh files -> watertight mesh -> surface/sharp points, SDF-labelled queries,
occupancy -> WebDataset shards. ``jobs`` runs a set of inputs (worker pool, resume, job split);
``pipeline`` turns one mesh into one sample; the other modules are its stages."""
