"""Measures of a dataset from its cached feature maps, on arrays: near-duplicates, label issues
and how unlike the training data an image is. The audit and predict call them; nothing here
imports a stage."""
