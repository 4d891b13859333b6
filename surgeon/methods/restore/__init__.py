"""restore (docs/method.md; Yang et al., IEEE S&P 2025) as a package: `run` the method over the
engine, `record` its part of surgeon.json and how the report, the card and the console show it."""
