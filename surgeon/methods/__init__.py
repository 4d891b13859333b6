"""Repair methods. Each takes the layered engine and prepared inputs, and returns masks."""
