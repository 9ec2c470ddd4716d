"""Stanch models."""
