"""Small example tasks for running the pipeline on a real model (see the README's "A real model")."""
