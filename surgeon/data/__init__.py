"""Datasets of prompts and answers, and their chat-templated, left-padded batches."""
