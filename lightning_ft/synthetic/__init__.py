"""Generators of synthetic model files with the exact structure of the real
releases (FLAME, embeddings, EMOCA, texture space), for tests and demos.

The real files are license-gated; these stand-ins let every loader and stage
run on real code paths. Results computed with them are not face tracks of a
real FLAME model and must be labelled as such.
"""
