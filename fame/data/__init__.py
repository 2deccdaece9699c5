"""Datasets and LightningDataModules for every supported format, plus synthetic ground truth."""
