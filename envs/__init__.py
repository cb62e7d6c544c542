"""Environments for data generation and closed-loop evaluation."""
