"""Verbs of the lrctl command line, one module per group."""
