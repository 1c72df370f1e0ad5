"""The model on a mesh, without an optimizer: what training, evaluation and checkpoint reads share."""
