"""Training and validation results: parse JSON lines, judge gates, render reports."""
