"""Scores that gate and judge a repair."""
