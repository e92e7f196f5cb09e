"""Models: the tiny offline demo models and resolving a model name to something loadable."""
