"""Operators: one folder per op, one file per backend."""
