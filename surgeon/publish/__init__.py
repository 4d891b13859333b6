"""Model card and Hub push."""
